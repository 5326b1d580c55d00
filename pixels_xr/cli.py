"""The ``pixels-xr`` command line: thin commands over the Python API; bad input is one line, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pixels_xr.errors import PixelsError

app = typer.Typer(
    name="pixels-xr",
    help="Satellite imagery at scale: STAC search → lazy xarray cubes → composites → Zarr/COG; PXM tiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
#: Printed where the pxm commands are missing; escaped because help text is rich markup (``[pxm]`` is a tag).
PXM_INSTALL_HINT = "pip install 'pixels-xr[pxm]'"


def _flags_show_as_flags() -> None:
    """Help without a ``<bool>`` value after ``--overwrite/--no-overwrite``, ``--quiet`` or ``--help``.

    typer 0.29 prints the parameter type of every option in rich help, flags included, as if they took a
    value; a flag has no value to show. Wrapped once, and only where typer has the method it wraps.
    """
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - another typer layout: its own help stays as it is
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_pixels_xr_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return original(self, ctx)

    display_type_rich._pixels_xr_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_as_flags()


def one_line_errors(func: F) -> F:
    """Print the project's own errors as one line on stderr and exit 1 (2 for interrupted runs)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PixelsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@one_line_errors
def validate(
    config: Annotated[Path, typer.Argument(help="Pixels configuration JSON file.")],
    features: Annotated[Path | None, typer.Option("--features", "-f",
                                                  help="GeoJSON FeatureCollection of input geometries.")] = None,
) -> None:
    """Validate CONFIG (and FEATURES) and print the resolved plan: features, bins, collection, bands, grids."""
    from pixels_xr.config import load_config
    from pixels_xr.plan import plan

    cfg = load_config(config)
    typer.echo(f"config: {config} ok")
    typer.echo(f"  platform {', '.join(p.name for p in cfg.platform_list)} {cfg.resolved_level}; catalog {cfg.catalog}; "
               f"collection {cfg.collection_id or '(any in local catalog)'}")
    typer.echo(f"  mode {cfg.mode}" + (f" ({cfg.resolved_composite_method})" if cfg.mode == "composite" else "")
               + (f"; bins of {cfg.resolved_interval_step} {cfg.interval}" if cfg.interval else ""))
    typer.echo(f"  bands {', '.join(cfg.band_names)}; scale {cfg.resolved_scale}; maxcloud {cfg.maxcloud}; "
               f"clip {cfg.clip}; mask {_describe_mask(cfg)}")
    if features is None and cfg.geojson is None:
        return
    plans = plan(cfg, _features(cfg, features))
    total = 0
    for p in plans:
        g = p.grid
        total += p.pixels * max(1, len(p.bins)) * len(cfg.bands)
        typer.echo(f"  feature {p.feature.id}: {p.start}..{p.end}, "
                   f"{len(p.bins) if cfg.mode != 'all' else 'per-acquisition'} slices, "
                   f"grid {g.width}×{g.height} @ {g.scale} in EPSG:{g.epsg}")
    typer.echo(f"  {len(plans)} features; ≈{total:,} output values")


def _features(cfg: Any, path: Path | None) -> list:
    """The features of a command: ``--features`` or, as the original pixels takes them, the config's
    ``geojson``."""
    from pixels_xr.errors import ConfigError
    from pixels_xr.features import load_features

    if path is not None:
        return load_features(path)
    if cfg.geojson is not None:
        return load_features(cfg.geojson)
    raise ConfigError("give a features file, or a geojson in the configuration", "--features")


def _describe_mask(cfg: Any) -> str:
    spec = cfg.mask_spec
    if spec is None:
        return "none"
    rule = (f"clear values {list(spec.clear_values)}" if spec.clear_values is not None else
            "; ".join(x for x in (f"not clear values {list(spec.not_clear_values)}" if spec.not_clear_values
                                  else "", f"not clear bits {list(spec.not_clear_bits)}"
                                  if spec.not_clear_bits else "") if x))
    return f"{spec.asset} ({rule})"


@app.command()
@one_line_errors
def sample(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic sample catalog into.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed → identical files).")] = 0,
    n_dates: Annotated[int, typer.Option(help="Number of acquisition dates.")] = 36,
    size: Annotated[int, typer.Option(help="Tile width and height in pixels.")] = 256,
) -> None:
    """Write a small SYNTHETIC Sentinel-2 L2A catalog (COGs + static STAC) and features for offline runs."""
    from pixels_xr.testing.sample import make_sample

    info = make_sample(out_dir, seed=seed, n_dates=n_dates, width=size, height=size)
    typer.echo(f"synthetic sample written: catalog {info.catalog}, features {info.features}")


@app.command()
@one_line_errors
def preview(
    config: Annotated[Path, typer.Argument(help="Pixels configuration JSON file.")],
    features: Annotated[Path | None, typer.Option(
        "--features", "-f", help="GeoJSON FeatureCollection (default: the config's geojson).")] = None,
    limit: Annotated[int, typer.Option(help="Collect at most this many features.")] = 3,
) -> None:
    """Collect the first features in memory (no output written) and print one line per time slice."""
    import json

    import numpy as np

    from pixels_xr.compose import collect
    from pixels_xr.config import load_config

    cfg = load_config(config)
    for feature in _features(cfg, features)[:limit]:
        ds = collect(cfg, feature).compute()
        filtered = json.loads(ds.attrs.get("items_filtered", "{}"))
        typer.echo(f"feature {feature.id}: {dict(ds.sizes)} in {ds.rio.crs}"
                   + (f"; empty: {ds.attrs['empty_reason']}" if ds.attrs.get("empty_reason") else "")
                   + ("; items left out by filters: " + ", ".join(f"{r} {n}" for r, n in sorted(filtered.items()))
                      if filtered else ""))
        band = cfg.band_names[0]
        for k in range(ds.sizes["time"]):
            values = ds[band].isel(time=k).values
            ok = np.isfinite(values) if values.dtype.kind == "f" else values != 0
            typer.echo(f"  {str(ds.time.values[k])[:10]}: {ok.mean():6.1%} filled, "
                       f"median {band} {np.nanmedian(np.where(ok, values, np.nan)) if ok.any() else float('nan'):.4f}, "
                       f"clear obs/pixel {ds.clear_count.isel(time=k).values.mean():.2f}"
                       + (" (empty bin)" if "empty" in ds.coords and bool(ds.empty.values[k]) else ""))


@app.command()
@one_line_errors
def collect(
    config: Annotated[Path, typer.Argument(help="Pixels configuration JSON file.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output: a .zarr store or a COG folder (path or URL).")],
    features: Annotated[Path | None, typer.Option(
        "--features", "-f", help="GeoJSON FeatureCollection (default: the config's geojson).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="zarr (one store, a group per feature) or cog.")] = "zarr",
    cluster: Annotated[str, typer.Option(help="'local', a scheduler address (tcp://…) or 'gateway'.")] = "local",
    workers: Annotated[int | None, typer.Option(
        help="Workers: local cluster processes (1 to 4 per core) or a fixed Gateway size.")] = None,
    zarr_format: Annotated[int, typer.Option(help="Zarr format version, 3 or 2.")] = 3,
    overwrite: Annotated[bool, typer.Option(help="Redo every unit (and accept a changed config).")] = False,
    window: Annotated[int | None, typer.Option(help="Units in flight (default: 4 × cluster threads, at least 16).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or dashboard link.")] = False,
    plan: Annotated[bool, typer.Option(
        "--plan", help="Print what a run would compute per feature and why (new, stale, retry; gone bins are "
                       "kept); write nothing.")] = False,
) -> None:
    """Search, build and write every feature into OUT on a Dask cluster; resumable and incremental (a re-run
    computes only units that are new or whose items changed)."""
    from pixels_xr.batch import run_batch
    from pixels_xr.cluster import check_options, check_workers
    from pixels_xr.config import load_config
    from pixels_xr.errors import ConfigError

    if window is not None and window < 1:
        raise ConfigError(f"must be at least 1, got {window}", "--window")
    if workers is not None:
        check_workers(workers, "--workers", local=cluster.strip() == "local")
    cfg = load_config(config)
    options = cfg.cluster.model_copy(update={"workers": workers}) if workers is not None else cfg.cluster
    check_options(options, local=cluster.strip() == "local")  # before the output is touched or a cluster starts
    if plan:
        report = run_batch(cfg, _features(cfg, features), out, output_format=fmt,  # type: ignore[arg-type]
                           zarr_format=zarr_format, overwrite=overwrite, plan_only=True)
        for result in report.features:
            typer.echo(_plan_line(result))
        states = report.unit_states()
        computed = sum(n for s, n in states.items() if s != "gone")
        typer.echo(f"plan: {len(report.features)} features, {computed} units to compute"
                   + (f" ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})" if states else "")
                   + f", {report.units_skipped} done; nothing written → {out}")
        raise typer.Exit(1 if report.failed else 0)
    try:
        report = run_batch(cfg, _features(cfg, features), out, cluster=cluster, cluster_options=options,
                           output_format=fmt, zarr_format=zarr_format, overwrite=overwrite,  # type: ignore[arg-type]
                           window=window, progress=not quiet)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the units finished so far are kept in {out}; run the same command again to "
                   "write the rest", err=True)
        raise typer.Exit(130) from None
    for failed in report.failed:
        typer.echo(f"failed: {failed.id} at {failed.stage}: {failed.error}", err=True)
    for result in report.features:
        if result.status == "degraded":
            typer.echo(f"degraded: {result.id}: {result.error}", err=True)
    if report.skipped_assets:
        typer.echo(f"warning: {report.skipped_assets} unreadable assets were left out (on_asset_error: skip); "
                   "see the report", err=True)
    typer.echo(report.summary())
    typer.echo(f"report: {report.report_url}")
    if not report.ok:
        raise typer.Exit(1)
    if report.skipped_assets:
        raise typer.Exit(3)  # complete, but without some items: a nightly job should notice


@app.command("stats")
@one_line_errors
def stats_command(
    config: Annotated[Path, typer.Argument(help="Pixels configuration JSON file (its `indices` are reduced too).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output table: .parquet (GeoParquet) or .csv (path or URL).")],
    features: Annotated[Path | None, typer.Option(
        "--features", "-f", help="GeoJSON FeatureCollection of the fields (default: the config's geojson).")] = None,
    percentiles: Annotated[str, typer.Option(help="Percentiles besides the median, comma-separated (e.g. 10,90).")]
    = "",
    centre: Annotated[bool, typer.Option("--centre", help="Pixel-centre rule instead of exact coverage fractions.")]
    = False,
    cluster: Annotated[str, typer.Option(help="'local', a scheduler address (tcp://…) or 'gateway'.")] = "local",
    quiet: Annotated[bool, typer.Option(help="No dashboard link.")] = False,
) -> None:
    """Zonal statistics of every field × time bin (count, clear fraction, mean, std, min, max, median,
    percentiles of each band and index) into one table; resumable (a re-run skips the groups done)."""
    from pixels_xr.config import load_config
    from pixels_xr.errors import ConfigError
    from pixels_xr.stats import stats

    try:
        qs = [float(q) for q in percentiles.split(",") if q.strip()]
    except ValueError:
        raise ConfigError(f"not a comma-separated list of numbers: {percentiles!r}", "--percentiles") from None
    cfg = load_config(config)
    table = stats(cfg, _features(cfg, features), out, percentiles=qs, coverage="centre" if centre else "exact",
                  cluster=cluster, progress=not quiet)
    typer.echo(f"{len(table)} rows ({table['id'].nunique() if len(table) else 0} features) → {out}")


def _plan_line(result: Any) -> str:
    """One feature of ``collect --plan``: its units to compute and why, and the bins kept outside the range."""
    if result.status == "failed":
        return f"{result.id}: failed at {result.stage}: {result.error}"
    todo = [u for u in result.units if u["state"] != "gone"]
    gone = [u["unit"] for u in result.units if u["state"] == "gone"]
    parts = [f"{u['unit']} {u['state']} ({u['reason']})" for u in todo]
    text = f"{result.id}: " + (f"{len(todo)} to compute: " + "; ".join(parts) if todo else "up to date")
    return text + (f"; {len(gone)} kept outside the range: {', '.join(gone)}" if gone else "")


@app.command()
@one_line_errors
def quicklook(
    store: Annotated[str, typer.Argument(help="A run's Zarr store (path or URL), one group per feature.")],
    feature: Annotated[str | None, typer.Option("--feature", help="Only this feature id.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")] = Path("quicklooks"),
) -> None:
    """Write PNG quicklooks per feature: RGB per time bin, clear_count and source_time maps (plot extra)."""
    from pixels_xr.plot import write_quicklooks

    for path in write_quicklooks(store, out, feature):
        typer.echo(str(path))


@app.command()
@one_line_errors
def predict(
    model: Annotated[str, typer.Argument(help=".keras file or SavedModel folder (sidecar JSON beside it).")],
    store: Annotated[str, typer.Argument(help="Engine Zarr store (path or URL; STORE/GROUP works too).")],
    out: Annotated[str, typer.Option("--out", help="Output Zarr store, or folder of COGs (path or URL).")],
    fmt: Annotated[str, typer.Option("--format", help="zarr or cog (one COG per date).")] = "zarr",
    group: Annotated[str | None, typer.Option("--group", help="Group (feature id) inside the store.")] = None,
    output: Annotated[str, typer.Option(help="probabilities or classes (uint8, colours).")] = "probabilities",
    uint8: Annotated[bool, typer.Option("--uint8", help="uint8 probabilities (p×254, 255 nodata).")] = False,
    overlap: Annotated[int | None, typer.Option(help="Receptive-field margin (default: sidecar).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pixels or tiles per model call.")] = None,
    cluster: Annotated[str | None, typer.Option(help="'local', a scheduler address or 'gateway' "
                                                     "(default: threads in this process).")] = None,
) -> None:
    """Run MODEL over a Zarr cube blockwise and write probabilities or classes as Zarr or COGs."""
    import contextlib

    from pixels_xr.cluster import open_client
    from pixels_xr.errors import ConfigError
    from pixels_xr.inference import predict as run_model
    from pixels_xr.io.predictions import open_input, write_predictions

    if fmt not in ("zarr", "cog"):
        raise ConfigError(f"unknown format {fmt!r}; use zarr or cog", "--format")
    with open_client(cluster) if cluster else contextlib.nullcontext():
        result = run_model(open_input(store, group), model, output=output,  # type: ignore[arg-type]
                           probability_dtype="uint8" if uint8 else "float32", overlap=overlap,
                           batch_size=batch_size)
        for path in write_predictions(result, out, fmt):  # type: ignore[arg-type]
            typer.echo(path)


@app.command()
@one_line_errors
def serve(
    path: Annotated[Path, typer.Argument(
        help="A run's Zarr store or COG folder, a tileset, or a pxm render --out folder.")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; only loopback unless you say so.")]
    = "127.0.0.1",
) -> None:
    """Serve a map of PATH on loopback: a run's outputs per time bin, or PXM tilesets (serve extra)."""
    try:
        from pixels_xr.serve import LOOPBACK, MapServer
    except ImportError as exc:
        from pixels_xr.errors import ConfigError

        raise ConfigError(f"the map needs the serve extra ({exc}): pip install 'pixels-xr[serve]'",
                          "serve") from None
    server = MapServer(path, host=host, port=port).start()
    if host not in LOOPBACK:
        typer.echo(f"warning: listening on {host}: anyone who can reach it can read every file under {path}",
                   err=True)
    typer.echo(f"map of {path}: {server.url} (Ctrl-C stops)")
    try:
        server.wait()
    except KeyboardInterrupt:  # the normal way to stop a server: exit 0
        typer.echo("stopped")
    finally:
        server.stop()


#: Modules of the pxm extra (``pyproject.toml``): looked up, not imported, when the command line is built
#: (``pixels_xr.pxm`` imports them on first use, so importing it no longer tells whether the extra is there).
PXM_EXTRA_MODULES = ("regex", "morecantile", "pmtiles", "mercantile", "PIL", "deflate")


def _mount_pxm() -> None:
    import importlib.util

    try:
        absent = [m for m in PXM_EXTRA_MODULES if importlib.util.find_spec(m) is None]
        if absent:
            raise ImportError(f"no module named {', '.join(repr(m) for m in absent)}")
        from pixels_xr.pxm.cli import pxm_app
    except (ImportError, ValueError) as exc:  # the pxm extra is not installed
        missing = str(exc)

        from rich.markup import escape

        @app.command("pxm", help=f"PXM manifests (needs the pxm extra: {escape(PXM_INSTALL_HINT)}).",
                     context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        def pxm_missing() -> None:
            typer.echo(f"error: pxm: the pxm commands need the pxm extra ({missing}); {PXM_INSTALL_HINT}", err=True)
            raise typer.Exit(1)
    else:
        app.add_typer(pxm_app, name="pxm", help="PXM (Mapbox Pixelmonster) manifests: validate and check sources.")


_mount_pxm()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


@app.command()
@one_line_errors
def samples(
    config: Annotated[Path, typer.Argument(help="Pixels configuration JSON file (the cubes to sample).")],
    labels: Annotated[Path, typer.Argument(help="GeoJSON points/polygons with a class property.")],
    out: Annotated[str, typer.Argument(help="Sample store folder (path or URL).")],
    features: Annotated[Path | None, typer.Option("--features", "-f", help="Features to collect (default: one "
                                                                           "per label).")] = None,
    source: Annotated[str | None, typer.Option(help="A collect Zarr output to sample instead of collecting.")] = None,
    spec: Annotated[Path | None, typer.Option(help="JSON file of sample settings (training.SampleSpec).")] = None,
    kind: Annotated[str | None, typer.Option(help="pixels (Parquet) or chips (Zarr).")] = None,
    size: Annotated[int | None, typer.Option(help="Chip size in pixels.")] = None,
    time: Annotated[int | None, typer.Option(help="Keep one time step (index); default all.")] = None,
    block_size: Annotated[float | None, typer.Option(help="Split block size, CRS units.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice.")] = None,
    class_property: Annotated[str, typer.Option(help="Label property holding the class.")] = "class",
    cluster: Annotated[str, typer.Option(help="'local', a scheduler address, 'gateway' or 'none' (threads "
                                              "in this process).")] = "local",
    overwrite: Annotated[bool, typer.Option(help="Replace samples drawn with other settings.")] = False,
) -> None:
    """Draw training samples of LABELS from the cubes of CONFIG into OUT (resumable); print the counts."""
    import json as _json

    from pixels_xr.config import load_config
    from pixels_xr.errors import ConfigError
    from pixels_xr.features import load_features
    from pixels_xr.jsontext import loads
    from pixels_xr.training import build_samples, load_labels

    settings: dict[str, Any] = {}
    if spec is not None:
        try:
            settings = loads(spec.read_bytes(), str(spec), ConfigError)
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", str(spec)) from None
    settings.update({k: v for k, v in {"kind": kind, "size": size, "time": time, "block_size": block_size,
                                       "seed": seed}.items() if v is not None})
    cfg = load_config(config)
    manifest = build_samples(load_labels(labels, class_property=class_property), out, config=cfg,
                             features=load_features(features) if features is not None else None, source=source,
                             spec=settings, cluster=None if cluster == "none" else cluster)
    counts = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    typer.echo(f"{sum(counts.values())} {manifest['kind']} samples ({', '.join(f'{s} {n}' for s, n in counts.items())})"
               f"; rejected {_json.dumps(manifest['rejected'])} → {out}")
