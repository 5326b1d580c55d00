"""PXM render benchmark: ``pixels-xr pxm render`` vs ``rio mbtiles`` vs ``gdal2tiles.py`` on the same input.

Same input (a real Sentinel-2 TCI image served by a local moto S3 server, read by all three over /vsis3/),
same zoom range, same number of worker processes, PNG tiles for all three (ours also with ``auto``). Each
tool runs as a command in a subprocess, so process and cluster start-up count for everyone. Prints tiles/s
and output size with ratios and writes them between the ``pxm-render`` markers in ``benchmarks/RESULTS.md``.

Needs the ``bench`` extra plus ``uv pip install --no-deps rio-mbtiles==1.6.0`` and Debian's ``gdal-bin``.
Usage: ``.venv/bin/python benchmarks/bench_pxm_render.py [--zooms 6-13] [--workers 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "rgb"
IMAGE = "s2_l2a_S2A_29RKH_20200219_TCI_100m.tif"


def run(cmd: list[str], env: dict[str, str]) -> float:
    """Run a command, fail loudly, return its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def mbtiles_stats(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*), sum(length(tile_data)) FROM tiles").fetchone()


def folder_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.suffix in (".png", ".jpg", ".webp")]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zooms", default="6-13")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    zmin, zmax = (int(v) for v in args.zooms.split("-"))
    from _common import machine_state, update_results
    from servers import S3Server, start_moto

    machine = machine_state()

    work = Path(tempfile.mkdtemp(prefix="bench-pxm-render-"))
    srv = S3Server(start_moto())
    rows = []
    try:
        with srv.activate():
            uri = srv.upload(DATA / IMAGE, "bench-pxm", "s2/S2A_29RKH_20200219_TCI_100m.tif")
            env = dict(os.environ)
            vsis3 = "/vsis3/" + uri[len("s3://"):]
            manifest = work / "manifest.json"
            manifest.write_text(json.dumps({"version": "0.5.1", "sources": [uri], "info": {
                "tilesets": ["bench.tci"], "license": "Copernicus Sentinel data 2020", "notes": "benchmark",
                "account": "bench", "product": "s2_tci", "date": "2020-02-19"}}))
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
                "rio mbtiles (png)": (rio, work / "rio.mbtiles"),
                "gdal2tiles.py (png)": (g2t, work / "g2t"),
            }
            for name, (cmd, out) in cases.items():
                seconds = run(cmd, env)
                tiles, size = mbtiles_stats(out) if out.suffix == ".mbtiles" else folder_stats(out)
                rows.append((name, cmd, seconds, tiles, size))
                print(f"{name}: {tiles} tiles, {seconds:.1f} s, {tiles / seconds:.1f} tiles/s, "
                      f"{size / 1e6:.2f} MB")
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    ours_png = rows[0]
    rate = {name: tiles / seconds for name, _, seconds, tiles, _ in rows}
    lines = [
        "## PXM render: pixels-xr vs rio-mbtiles vs gdal2tiles",
        "",
        f"`.venv/bin/python benchmarks/bench_pxm_render.py --zooms {args.zooms} --workers {args.workers}` — "
        f"input `{IMAGE}` (real Sentinel-2 TCI, 1098² px at 100 m, EPSG:32629, nodata 0) served by "
        f"moto_server and read over /vsis3/ by all three; zooms {zmin}-{zmax}, {args.workers} worker "
        "processes each, bilinear, empty tiles skipped; wall clock of each command (start-up included), "
        "one run each. "
        f"Machine: {machine}.",
        "",
        "| tool | tiles | seconds | tiles/s | output MB | speed: ours (png) / tool"
        " | size: ours (png) / tool |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, seconds, tiles, size in rows:
        lines.append(f"| {name} | {tiles} | {seconds:.1f} | {tiles / seconds:.1f} | {size / 1e6:.2f} | "
                     f"{rate[ours_png[0]] / (tiles / seconds):.2f} | {ours_png[4] / size:.2f} |")
    goal = rate[ours_png[0]] / rate["rio mbtiles (png)"]
    lines += ["", f"Goal ≥ 2× rio-mbtiles tiles/s: {'met' if goal >= 2 else 'NOT met'} ({goal:.2f}×)."]
    if len({tiles for _, _, _, tiles, _ in rows}) > 1:
        lines.append("Tile counts differ: the tools decide differently which tiles at the footprint's edge"
                     " are empty; tiles/s uses each tool's own count.")
    text = "\n".join(lines)
    print(text)
    update_results("pxm-render", text)


if __name__ == "__main__":
    main()
