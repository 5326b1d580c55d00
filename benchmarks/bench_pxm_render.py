"""PXM render benchmark: ``pixels-xr pxm render`` vs ``rio mbtiles`` vs ``gdal2tiles.py`` on the same input.

Same input (a real Sentinel-2 TCI image served by a local moto S3 server, read by all three over /vsis3/),
same zoom range, same number of workers, PNG tiles for all three (ours also with ``auto``, and on a local
cluster of worker processes instead of its default threads). Each tool runs as a command in a subprocess, so
process and cluster start-up count for everyone. Prints tiles/s
and output size with ratios and writes them between the ``pxm-render`` markers in ``benchmarks/RESULTS.md``.

Then, in this process on one thread and on the same input over /vsis3/, it times the **warp alone** (every
max-zoom block of the render through ``warp.render_block``: read, colour, GDAL warp, mask) and the **encode
alone** (``encode.encode_tile`` on every tile the PNG render wrote, decoded back to RGBA first): what is left
of ours' worker-seconds (wall × workers) is scheduling, start-up, the reductions and the scratch store. Peak
memory is the largest sum of RSS over each command's process tree (sampled every 0.2 s).

Needs the ``bench`` extra plus ``uv pip install --no-deps rio-mbtiles==1.6.0`` and Debian's ``gdal-bin``.
Usage: ``.venv/bin/python benchmarks/bench_pxm_render.py [--zooms 6-13] [--workers 2] [--image NAME]
[--skip-rio] [--skip-processes] [--png-filters] [--repeat N] [--tag pxm-render]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "rgb"
IMAGE = "s2_l2a_S2A_29RKH_20200219_TCI_100m.tif"
PROCESSES = "pixels-xr pxm render (png, --cluster local: worker processes)"
MANIFEST = {"version": "0.5.1", "info": {
    "tilesets": ["bench.tci"], "license": "benchmark input", "notes": "benchmark",
    "account": "bench", "product": "bench_input", "date": "2020-02-19"}}


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, float]:
    """Run a command, fail loudly; (wall seconds, peak bytes of RSS summed over its process tree, CPU
    seconds of the tree: user + system of every descendant reaped, which workers and pools are)."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, watched = 0, psutil.Process(proc.pid)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            tree = [watched, *watched.children(recursive=True)]
            total = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak = max(peak, total)
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    reader.join()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{''.join(out)[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, peak, cpu


def warp_alone(uri: str, zmax: int) -> tuple[float, int]:
    """(CPU seconds, blocks) of ``render_block`` over every max-zoom block of the render, on this thread."""
    import math

    from rasterio.enums import Resampling

    from pixels_xr.pxm.manifest import validate_manifest
    from pixels_xr.pxm.renderer import BLOCK_PIXELS
    from pixels_xr.pxm.tiles import tiles_in
    from pixels_xr.pxm.warp import describe_source, render_block

    info = validate_manifest(MANIFEST | {"sources": [uri]}).info
    spec = describe_source(uri, info, ())
    n = BLOCK_PIXELS // 256
    blocks = np.unique(tiles_in([spec.bounds], zmax) >> int(math.log2(n)), axis=0)
    t0 = time.process_time()
    for bx, by in blocks.tolist():
        render_block((spec,), zmax, bx * n, by * n, n, 256, Resampling.bilinear)
    return time.process_time() - t0, len(blocks)


def encode_alone(path: Path, tile_format: str) -> float:
    """CPU seconds of ``encode_tile`` on every tile of an MBTiles file (decoded to RGBA first, not timed)."""
    from PIL import Image

    from pixels_xr.pxm.encode import encode_tile

    with sqlite3.connect(path) as db:
        data = [d for (d,) in db.execute("SELECT tile_data FROM tiles")]
    tiles = [np.asarray(Image.open(io.BytesIO(d)).convert("RGBA")) for d in data]
    t0 = time.process_time()
    for tile in tiles:
        encode_tile(tile, tile_format)
    return time.process_time() - t0


def _filter_rows(rows: np.ndarray, bpp: int, k: int) -> np.ndarray:
    """PNG filter ``k`` (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) of every row of ``rows`` (h, n), uint8."""
    if k == 0:
        return rows
    if k == 2:  # as encode.encode_png does it
        out = np.empty_like(rows)
        out[0] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=out[1:])
        return out
    x = rows.astype(np.int16)
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    if k == 1:
        return (x - left).astype(np.uint8)  # modulo 256, as PNG defines them
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    if k == 3:
        return (x - ((left + up) >> 1)).astype(np.uint8)
    corner = np.zeros_like(x)
    corner[1:, bpp:] = x[:-1, :-bpp]
    p = left + up - corner
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - corner)
    return (x - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))).astype(np.uint8)


def _filtered(rows: np.ndarray, bpp: int, kind: str) -> np.ndarray:
    """PNG scanlines (filter byte + filtered row) with one filter everywhere or libpng's per-row choice."""
    out = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
    if kind == "adaptive":  # libpng's heuristic: the filter of least sum of |signed byte| per row
        cand = np.stack([_filter_rows(rows, bpp, k) for k in range(5)])
        choice = np.abs(cand.view(np.int8).astype(np.int16)).sum(axis=2).argmin(axis=0)
        out[:, 0] = choice
        out[:, 1:] = cand[choice, np.arange(len(rows))]
    else:
        k = {"up": 2, "average": 3, "paeth": 4}[kind]
        out[:, 0] = k
        out[:, 1:] = _filter_rows(rows, bpp, k)
    return out


def png_filters(path: Path, native: int) -> list[str]:
    """Result lines: PNG bytes and CPU ms/tile of filter choices on the RGB/RGBA tiles of a PNG render, above
    and at/below the native zoom (palette tiles left out: they are not filtered). Up is ours, as the encoder
    computes it; the others in plain numpy (int16), so their time is an upper bound."""
    import deflate
    from PIL import Image

    from pixels_xr.pxm.encode import PNG_LEVEL

    with sqlite3.connect(path) as db:
        data = db.execute("SELECT zoom_level, tile_data FROM tiles").fetchall()
    groups: dict[bool, list[tuple[np.ndarray, int]]] = {False: [], True: []}
    for z, blob in data:
        img = Image.open(io.BytesIO(blob))
        if img.mode in ("RGB", "RGBA"):
            px = np.asarray(img)
            groups[z > native].append((px.reshape(px.shape[0], -1), px.shape[2]))
    lines = []
    for magnified, tiles in groups.items():
        if not tiles:
            continue
        cells = []
        for kind in ("up", "paeth", "average", "adaptive", "smaller of up and adaptive"):
            t0, size = time.process_time(), 0
            for rows, bpp in tiles:
                if kind.startswith("smaller"):
                    size += min(len(deflate.zlib_compress(_filtered(rows, bpp, k).tobytes(), PNG_LEVEL))
                                for k in ("up", "adaptive"))
                else:
                    size += len(deflate.zlib_compress(_filtered(rows, bpp, kind).tobytes(), PNG_LEVEL))
            ms = (time.process_time() - t0) / len(tiles) * 1000
            cells.append(f"{kind} {size / 1e6:.3f} MB at {ms:.1f} ms/tile")
        lines.append(f"PNG filters on ours' {len(tiles)} RGB/RGBA tiles at zooms "
                     f"{'above' if magnified else 'at or below'} native (libdeflate {PNG_LEVEL}): "
                     + "; ".join(cells) + ".")
    return lines


def mbtiles_stats(path: Path) -> dict[int, tuple[int, int]]:
    """{zoom: (tiles, bytes)} of an MBTiles file."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT zoom_level, count(*), sum(length(tile_data)) FROM tiles GROUP BY zoom_level")
        return {z: (n, size) for z, n, size in rows}


def folder_stats(path: Path) -> dict[int, tuple[int, int]]:
    """{zoom: (tiles, bytes)} of an XYZ folder."""
    stats: dict[int, tuple[int, int]] = {}
    for p in path.rglob("*"):
        if p.suffix in (".png", ".jpg", ".webp"):
            z = int(p.relative_to(path).parts[0])
            n, size = stats.get(z, (0, 0))
            stats[z] = (n + 1, size + p.stat().st_size)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zooms", default="6-13")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image", default=IMAGE, help="a file of ../shared/data/rgb")
    ap.add_argument("--skip-rio", action="store_true", help="leave rio-mbtiles out (long renders)")
    ap.add_argument("--skip-processes", action="store_true",
                    help="leave out ours on a LocalCluster of worker processes (--cluster local)")
    ap.add_argument("--png-filters", action="store_true",
                    help="also compare PNG filter choices (Up, Paeth, Average, per-row adaptive) on ours' tiles")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every tool but rio-mbtiles (alternating); the fastest round counts")
    ap.add_argument("--tag", default="pxm-render", help="RESULTS.md section (pxm-render, pxm-render-long)")
    args = ap.parse_args()
    zmin, zmax = (int(v) for v in args.zooms.split("-"))
    from _common import machine_state, update_results
    from servers import S3Server, start_moto

    from pixels_xr.pxm.tiles import native_zoom
    from pixels_xr.pxm.warp import describe_source

    machine = machine_state()
    work = Path(tempfile.mkdtemp(prefix="bench-pxm-render-"))
    srv = S3Server(start_moto())
    rows = []
    try:
        with srv.activate():
            key = "input/" + args.image.replace(".tif", "").replace(".", "_").replace("-", "_") + ".tif"
            uri = srv.upload(DATA / args.image, "bench-pxm", key)
            env = dict(os.environ)
            vsis3 = "/vsis3/" + uri[len("s3://"):]
            manifest = work / "manifest.json"
            manifest.write_text(json.dumps(MANIFEST | {"sources": [uri]}))
            native = native_zoom(describe_source(uri, MANIFEST["info"], ()).res, 256)
            venv = Path(sys.executable).parent
            ours = [str(venv / "pixels-xr"), "pxm", "render", str(manifest), "--minzoom", str(zmin),
                    "--maxzoom", str(zmax), "--workers", str(args.workers), "--resampling", "bilinear"]
            zooms, jobs = f"{zmin}-{zmax}", str(args.workers)
            rio = [str(venv / "rio"), "mbtiles", vsis3, str(work / "rio.mbtiles"), "--format", "PNG",
                   "--zoom-levels", zooms.replace("-", ".."), "-j", jobs, "--resampling", "bilinear",
                   "--exclude-empty-tiles"]
            g2t = ["gdal2tiles.py", "--xyz", "-q", "-z", zooms, "-r", "bilinear", "--processes", jobs,
                   "-w", "none", vsis3, str(work / "g2t")]
            cases = {
                "pixels-xr pxm render (png)": (ours + ["--out", str(work / "png"), "--tile-format", "png"],
                                               work / "png" / "bench.tci.mbtiles"),
                "pixels-xr pxm render (auto: jpeg/png)": (ours + ["--out", str(work / "auto")],
                                                          work / "auto" / "bench.tci.mbtiles"),
                PROCESSES: (ours + ["--out", str(work / "proc"), "--tile-format", "png", "--cluster", "local"],
                            work / "proc" / "bench.tci.mbtiles"),
                "rio mbtiles (png)": (rio, work / "rio.mbtiles"),
                "gdal2tiles.py (png)": (g2t, work / "g2t"),
            }
            if args.skip_rio:
                del cases["rio mbtiles (png)"]
            if args.skip_processes:
                del cases[PROCESSES]
            best: dict[str, tuple] = {}
            for round_ in range(args.repeat):
                for name, (cmd, out) in cases.items():
                    if round_ and name.startswith("rio"):
                        continue
                    for old in (out, *out.parent.glob(out.name + "*")):  # outputs of the previous round
                        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
                    seconds, peak, cpu = run(cmd, env)
                    stats = mbtiles_stats(out) if out.suffix == ".mbtiles" else folder_stats(out)
                    tiles, size = sum(n for n, _ in stats.values()), sum(b for _, b in stats.values())
                    print(f"{name}: {tiles} tiles, {seconds:.1f} s, {tiles / seconds:.1f} tiles/s, "
                          f"CPU {cpu:.1f} s, {size / 1e6:.2f} MB, peak RSS {peak / 2**20:.0f} MiB", flush=True)
                    if name not in best or seconds < best[name][1]:
                        best[name] = (name, seconds, tiles, size, peak, stats, cpu)
            rows = list(best.values())
            warp_s, blocks = warp_alone(uri, zmax)
            encode_s = encode_alone(work / "png" / "bench.tci.mbtiles", "png")
            filters = png_filters(work / "png" / "bench.tci.mbtiles", native) if args.png_filters else []
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    ours_png = rows[0]
    rate = {name: tiles / seconds for name, seconds, tiles, *_ in rows}
    cpu_of = {row[0]: row[6] for row in rows}
    lines = [
        "## PXM render: pixels-xr vs rio-mbtiles vs gdal2tiles" + (" (long render)" if args.tag != "pxm-render"
                                                                   else ""),
        "",
        f"`.venv/bin/python benchmarks/bench_pxm_render.py --zooms {args.zooms} --workers {args.workers}"
        + (f" --image {args.image}" if args.image != IMAGE else "") + (" --skip-rio" if args.skip_rio else "")
        + (" --skip-processes" if args.skip_processes else "") + (" --png-filters" if args.png_filters else "")
        + (f" --repeat {args.repeat}" if args.repeat != 1 else "")
        + (f" --tag {args.tag}" if args.tag != "pxm-render" else "") + "` — "
        f"input `{args.image}` served by moto_server and read over /vsis3/ by every tool; zooms {zmin}-{zmax} "
        f"(the source's native zoom is {native}), {args.workers} workers each (ours: threads of one process by "
        "default, worker processes with `--cluster local`; rio-mbtiles and gdal2tiles: processes), bilinear, "
        "empty tiles skipped; wall clock of each command (start-up included), "
        + ("one run each" if args.repeat == 1 else f"the fastest of {args.repeat} alternating rounds (rio-mbtiles:"
           " one)") + "; CPU seconds and peak RSS summed over the command's process tree. "
        f"Machine: {machine}.",
        "",
        ("| tool | tiles | seconds | tiles/s | CPU s | output MB | peak RSS MiB | speed: ours (png) / tool"
         " | CPU: tool / ours (png) | size: ours (png) / tool |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds, tiles, size, peak, _, cpu in rows:
        lines.append(f"| {name} | {tiles} | {seconds:.1f} | {tiles / seconds:.1f} | {cpu:.1f} | {size / 1e6:.2f} | "
                     f"{peak / 2**20:.0f} | {rate[ours_png[0]] / (tiles / seconds):.2f} | "
                     f"{cpu / ours_png[6]:.2f} | {ours_png[3] / size:.2f} |")
    g2t_rate = rate["gdal2tiles.py (png)"]
    goal = rate[ours_png[0]] / g2t_rate
    lines += ["", (f"Speed, ours (png) / gdal2tiles: {goal:.2f}× (goal ≥ 1.5× at zooms 6–13, ≥ 2× on a long "
                   "render).")]
    if "rio mbtiles (png)" in rate:
        lines.append(f"Speed, ours (png) / rio-mbtiles: {rate[ours_png[0]] / rate['rio mbtiles (png)']:.2f}×.")
    g2t_stats = next(row[5] for row in rows if row[0] == "gdal2tiles.py (png)")
    for label, keep in (("not magnified (z ≤ native)", lambda z: z <= native),
                        ("magnified (z > native)", lambda z: z > native)):
        mine = sum(b for z, (_, b) in ours_png[5].items() if keep(z))
        theirs = sum(b for z, (_, b) in g2t_stats.items() if keep(z))
        if theirs:
            lines.append(f"PNG bytes at zooms {label}: ours {mine / 1e6:.2f} MB, gdal2tiles "
                         f"{theirs / 1e6:.2f} MB ({mine / theirs:.2f}×).")
    used = cpu_of[ours_png[0]]
    share = (warp_s + encode_s) / used
    lines.append(f"Alone, on one thread of this process, same input over /vsis3/ (CPU seconds): warp {warp_s:.1f} s "
                 f"({blocks} blocks of zoom {zmax}), encode {encode_s:.1f} s ({ours_png[2]} PNG tiles); "
                 f"ours (png) used {used:.1f} CPU seconds in all: warp + encode are {share:.0%} of it, the rest "
                 f"(start-up, scheduling, reductions, scratch store) {1 - share:.0%}.")
    lines += filters
    if len({tiles for _, _, tiles, *_ in rows}) > 1:
        lines.append("Tile counts differ: the tools decide differently which tiles at the footprint's edge"
                     " are empty; tiles/s uses each tool's own count.")
    text = "\n".join(lines)
    print(text)
    update_results(args.tag, text)


if __name__ == "__main__":
    main()
