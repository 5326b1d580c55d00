// The pixels-xr map page: PXM tilesets (PMTiles through Range requests, MBTiles/XYZ through /tiles) and a
// run's outputs (tiles rendered by the server per layer and time bin). No basemap: nothing leaves this host.
// Test hooks: window.pixelsXr = {map, idle (count of 'idle' events), errors (map and page errors)}.
import * as maplibregl from "./vendor/maplibre-gl.mjs";

const base = new URL(".", window.location.href).href;
const state = { map: null, idle: 0, errors: [], run: null, layer: "rgb", bin: 0 };
window.pixelsXr = state;
window.addEventListener("error", (e) => state.errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => state.errors.push(String(e.reason)));

const protocol = new pmtiles.Protocol();
maplibregl.addProtocol("pmtiles", protocol.tile);

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function union(boxes) {
  return boxes.reduce((a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[2], b[2]),
                                 Math.max(a[3], b[3])]);
}

function runTiles(run) {
  return [`${base}run/${state.layer}/${state.bin}/{z}/{x}/{y}.png`];
}

function legend(run) {
  const box = document.getElementById("legend");
  box.replaceChildren();
  if (state.layer === "rgb") {
    const parts = run.rgb.map((b) => `${b} ${run.stretch[b][0].toPrecision(3)}–${run.stretch[b][1].toPrecision(3)}`);
    box.textContent = `${run.rgb.join("/")} stretch 2–98 % of the run: ${parts.join("; ")}`;
    return;
  }
  const ramp = el("span", { class: "ramp", style: "background: linear-gradient(to right, #440154, #31688e, #35b779, #fde725)" });
  if (state.layer === "clear_count") {
    box.append("clear observations 0 (white) 1", ramp, String(run.max_clear_count));
  } else {
    box.append("acquisition used: first day of the bin", ramp, "last day");
  }
}

function showBin(run) {
  const label = run.bins[state.bin];
  document.getElementById("bin").textContent = `${label} (${state.bin + 1}/${run.bins.length})`;
}

function setupRun(map, run) {
  state.run = run;
  map.addSource("run", { type: "raster", tiles: runTiles(run), tileSize: 256, bounds: run.bounds,
                         minzoom: run.minzoom, maxzoom: run.maxzoom });
  map.addLayer({ id: "run", type: "raster", source: "run", paint: { "raster-resampling": "nearest",
                                                                       "raster-fade-duration": 0 } });
  map.addSource("features", { type: "geojson", data: { type: "FeatureCollection", features: run.features.map((f) => ({
    type: "Feature", properties: { id: f.id },
    geometry: { type: "Polygon", coordinates: [[[f.bounds[0], f.bounds[1]], [f.bounds[2], f.bounds[1]],
      [f.bounds[2], f.bounds[3]], [f.bounds[0], f.bounds[3]], [f.bounds[0], f.bounds[1]]]] } })) } });
  map.addLayer({ id: "features", type: "line", source: "features", paint: { "line-color": "#333", "line-width": 1,
                                                                            "line-opacity": 0.6 } });
  const layers = document.getElementById("layers");
  for (const name of run.layers) {
    const input = el("input", { type: "radio", name: "layer", value: name });
    input.checked = name === state.layer;
    input.addEventListener("change", () => { state.layer = name; refresh(map, run); });
    const label = el("label");
    label.append(input, ` ${name}`);
    layers.append(label);
  }
  const slider = document.getElementById("slider");
  slider.max = String(run.bins.length - 1);
  slider.addEventListener("input", () => { state.bin = Number(slider.value); refresh(map, run); });
  document.getElementById("time").hidden = false;
  showBin(run);
  legend(run);
  map.on("click", (e) => pixel(e.lngLat));
}

function refresh(map, run) {
  map.getSource("run").setTiles(runTiles(run));
  showBin(run);
  legend(run);
  highlight();
}

function setupTilesets(map, tilesets) {
  const layers = document.getElementById("layers");
  for (const t of tilesets) {
    const id = `tileset-${t.id}`;
    const source = t.kind === "pmtiles"
      ? { type: "raster", url: `pmtiles://${base}files/${t.path}`, tileSize: t.tile_size }
      : { type: "raster", tiles: [`${base}tiles/${encodeURIComponent(t.id)}/{z}/{x}/{y}`], tileSize: t.tile_size,
          bounds: t.bounds, minzoom: t.minzoom, maxzoom: t.maxzoom, attribution: t.attribution };
    map.addSource(id, source);
    map.addLayer({ id, type: "raster", source: id, paint: { "raster-fade-duration": 0 } });
    const input = el("input", { type: "checkbox", value: t.id });
    input.checked = true;
    input.addEventListener("change", () => map.setLayoutProperty(id, "visibility", input.checked ? "visible" : "none"));
    const label = el("label", { title: `${t.kind}, zoom ${t.minzoom}–${t.maxzoom}` });
    label.append(input, ` ${t.id}`);
    layers.append(label);
  }
}

function highlight() {
  for (const row of document.querySelectorAll("#pixel tr[data-bin]")) {
    row.classList.toggle("current", state.run && row.dataset.bin === state.run.bins[state.bin]);
  }
}

const COLOURS = { red: "#d62728", green: "#2ca02c", blue: "#1f77b4", nir: "#9467bd" };
const OTHERS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
const colour = (name, i) => COLOURS[name] || OTHERS[i % OTHERS.length];

function chart(bins, series, names) {
  const w = 420, h = 110, pad = 4;
  const values = names.flatMap((n) => series[n]).filter((v) => v !== null);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  if (!values.length) return svg;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi > lo ? hi - lo : 1;
  names.forEach((n, i) => {
    const points = series[n].map((v, k) => v === null ? null
      : `${pad + (k * (w - 2 * pad)) / Math.max(1, bins.length - 1)},${h - pad - ((v - lo) / span) * (h - 2 * pad)}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.filter((p) => p !== null).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour(n, i));
    line.setAttribute("stroke-width", "1.5");
    line.dataset.band = n;
    svg.append(line);
  });
  return svg;
}

async function pixel(lngLat) {
  const panel = document.getElementById("pixel");
  const response = await fetch(`${base}run/pixel?lon=${lngLat.lng}&lat=${lngLat.lat}`);
  if (response.status === 404) { panel.hidden = true; return; }
  const px = await response.json();
  const close = el("button", { class: "close", title: "close" }, "×");
  close.addEventListener("click", () => { panel.hidden = true; });
  const bands = state.run.bands;
  const table = el("table");
  const head = el("tr");
  for (const name of ["bin", ...bands, "clear", "used"]) head.append(el("th", {}, name));
  table.append(head);
  px.bins.forEach((label, k) => {
    const row = el("tr", { "data-bin": label });
    row.append(el("td", {}, label));
    for (const b of bands) {
      const v = px.series[b][k];
      row.append(el("td", {}, v === null ? "–" : v.toFixed(4)));
    }
    const count = px.series.clear_count ? px.series.clear_count[k] : null;
    row.append(el("td", {}, count === null ? "–" : String(count)));
    const used = px.series.source_time ? px.series.source_time[k] : null;
    row.append(el("td", {}, used === null ? "–" : used));
    table.append(row);
  });
  const title = el("div", { id: "pixel-title" },
    `${px.feature}: pixel row ${px.row}, col ${px.col} (x ${px.x}, y ${px.y}, ${px.crs})`);
  const keys = el("div");
  bands.forEach((b, i) => keys.append(el("span", { class: "key", style: `color: ${colour(b, i)}` }, b)));
  panel.replaceChildren(close, title, chart(px.bins, px.series, bands), keys, table);
  panel.hidden = false;
  highlight();
}

async function main() {
  const info = await (await fetch(`${base}api/layers`)).json();
  document.getElementById("title").textContent = info.path;
  const boxes = info.tilesets.map((t) => t.bounds).concat(info.run ? [info.run.bounds] : []);
  const map = new maplibregl.Map({
    container: "map",
    style: { version: 8, sources: {}, layers: [{ id: "background", type: "background",
                                                 paint: { "background-color": "#e4e4e4" } }] },
    bounds: union(boxes), fitBoundsOptions: { padding: 20 }, attributionControl: { compact: true },
  });
  state.map = map;
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }));
  map.addControl(new maplibregl.ScaleControl());
  map.on("error", (e) => { state.errors.push(String(e.error && e.error.message || e.error)); console.error(e.error); });
  map.on("idle", () => { state.idle += 1; });
  map.on("load", () => {
    if (info.run) setupRun(map, info.run);
    setupTilesets(map, info.tilesets);
  });
}

main().catch((err) => { state.errors.push(String(err)); console.error(err); });
