"""``pixels-xr pxm …`` commands (a typer sub-app): validate a PXM manifest and, optionally, its sources."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pixels_xr.errors import PixelsError

#: = pixels_xr.pxm.sources.MAX_PIXELS (not imported here: rasterio would load for every command).
MAX_PIXELS = 2**31

pxm_app = typer.Typer(
    name="pxm",
    help="PXM (Mapbox Pixelmonster) manifests: validate them and check their source images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@pxm_app.callback()
def pxm() -> None:
    """PXM (Mapbox Pixelmonster) manifests and sources."""


@pxm_app.command("validate")
def validate(
    manifest: Annotated[Path, typer.Argument(help="PXM manifest JSON file.")],
    check_sources: Annotated[
        bool, typer.Option("--check-sources", help="Also open every source on S3 and check it can be rendered.")
    ] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Most pixels (width x height) a source"
                                            " may declare.")] = MAX_PIXELS,
) -> None:
    """Validate MANIFEST: print the spec version read and a summary, or one error line per problem (exit 1)."""
    from pixels_xr.pxm.checks import check_sources as run_checks
    from pixels_xr.pxm.manifest import validate_manifest

    try:
        m = validate_manifest(manifest)
        typer.echo(f"{manifest}: valid PXM manifest, spec {m.version}"
                   + (f" (version {m.version_string})" if m.version_string else " (0.4 draft, no version)"))
        info = m.info
        typer.echo(f"  {len(m.sources)} source(s); tilesets {', '.join(info.tilesets)}; account {info.account};"
                   f" product {info.product}; date {info.date}")
        extras = [f"crs {info.crs}" if info.crs else "", f"ndv {list(info.ndv)}" if info.ndv else "",
                  f"bidx {list(info.bidx)}" if info.bidx else ""]
        if any(extras):
            typer.echo("  " + "; ".join(e for e in extras if e))
        if info.color:
            for uri in m.sources:
                rule = m.color_rule(uri)
                typer.echo(f"  colour {Path(uri).name}: " + (f"{rule.formula} (key {rule.key!r})" if rule else "none"))
            for key in m.unused_color_keys():
                typer.echo(f"  warning: colour key {key!r} matches no source")
        if check_sources:
            findings = run_checks(m, max_pixels=max_pixels)
            for f in findings:
                typer.echo(str(f), err=f.level == "error")
            errors = sum(f.level == "error" for f in findings)
            if errors:
                typer.echo(f"error: {errors} source check(s) failed", err=True)
                raise typer.Exit(1)
            typer.echo(f"  sources: {len(m.sources)} checked, ok")
    except PixelsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@pxm_app.command("render")
def render_cmd(
    manifest: Annotated[Path, typer.Argument(help="PXM manifest JSON file.")],
    out: Annotated[str, typer.Option("--out", help="Output folder or s3://bucket/prefix: one tileset per info.tilesets id.")],
    fmt: Annotated[str, typer.Option("--format", help="mbtiles, pmtiles or xyz.")] = "mbtiles",
    tile_format: Annotated[str, typer.Option("--tile-format", help="auto, png, jpeg or webp.")] = "auto",
    tile_size: Annotated[int, typer.Option("--tile-size", help="256 or 512 px.")] = 256,
    minzoom: Annotated[int | None, typer.Option("--minzoom", help="Lowest zoom (default: mosaic fits 2x2).")]
    = None,
    maxzoom: Annotated[int | None, typer.Option("--maxzoom", help="Highest zoom (default: from resolution).")]
    = None,
    resampling: Annotated[str, typer.Option("--resampling", help="Warp resampling.")] = "bilinear",
    cluster: Annotated[str, typer.Option("--cluster", help="threads (in this process), local (a Dask cluster of"
                                         " worker processes), a scheduler address or gateway.")] = "threads",
    workers: Annotated[int | None, typer.Option("--workers", help="Threads (threads; default one per core) or"
                                                " worker processes (local).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace outputs made differently.")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Most pixels (width x height) a source"
                                            " may declare.")] = MAX_PIXELS,
) -> None:
    """Render MANIFEST's sources to Web Mercator tilesets in OUT (a re-run resumes, or does nothing).

    Unreadable sources: one error line each, a summary line, exit 1, no tileset written (finished blocks are
    kept for a re-run). Ctrl-C: exit 130 with one line; outputs are never half-written.
    """
    from pixels_xr.pxm.renderer import UnreadableSources, render

    try:
        report = render(manifest, out, format=fmt, tile_format=tile_format,  # type: ignore[arg-type]
                        tile_size=tile_size, minzoom=minzoom, maxzoom=maxzoom, resampling=resampling,
                        cluster=cluster,
                        cluster_options={"workers": workers} if workers else None, overwrite=overwrite,
                        progress=True, max_pixels=max_pixels)
    except UnreadableSources as exc:
        for uri, message in exc.failures.items():
            typer.echo(f"error: {uri}: {message}", err=True)
        if exc.report is not None:
            typer.echo(f"error: {exc.report}", err=True)
        raise typer.Exit(1) from None
    except PixelsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: outputs are complete or absent; a re-run resumes from the finished blocks", err=True)
        raise typer.Exit(130) from None
    typer.echo(str(report))
