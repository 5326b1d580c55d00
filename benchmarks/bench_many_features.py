"""Many small features: N fields of 20 × 20 px against one field of the same pixels, per-feature client cost.

    .venv/bin/python benchmarks/bench_many_features.py [--counts 100,1000] [--no-write] [--profile OUT.txt]
    .venv/bin/python benchmarks/bench_many_features.py --scale 10000 [--no-write]

The synthetic sample (``make_sample``: 36 dates, one tile of 256² px or as large as the largest square
needs) with a monthly median over a year
(12 bins), Zarr, ``run_batch`` on one ``open_client("local")`` cluster shared by every run of this script.
The baseline is one feature covering a square of ``side`` × ``side`` pixels (side = 20 · √N); the same
square cut into N features of 20 × 20 px is run after it, into a fresh store, and the outputs are compared
where they overlap (each small feature equals its window of the big one). Client CPU is this process's
CPU time over the run (planning, search, graph building, submission, bookkeeping) divided by N. Results go
to the ``<!-- many-features -->`` section of RESULTS.md; ``--profile`` records a py-spy profile of the
client during the largest N run (``py-spy`` must be on PATH or in the venv).

``--scale N`` (``<!-- many-features-scale -->``): the N-feature run at scale, each run in a child process of
its own with its own ``open_client("local")`` (so it can be killed, and its memory is its own): the full
run (wall, client CPU, the client process's peak RSS — it also hosts the local scheduler — and the workers'
RSS sampled every 2 s), the no-op re-run, then a fresh run killed (SIGKILL to its whole process tree) once
half of its units are recorded, and its re-run, which must compute exactly the units the killed run had not
recorded and leave a store equal to the full run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_state, publish, table  # noqa: E402

WORK = Path(__file__).with_name("_work") / "many"
PX = 20  # pixels per side of a small feature
RES = 10.0


def squares(origin: tuple[float, float], n_side: int, size_px: int) -> list[tuple[float, ...]]:
    """``n_side`` × ``n_side`` squares of ``size_px`` pixels from ``origin`` (left, top), row by row."""
    left, top = origin
    step = size_px * RES
    return [(left + c * step, top - (r + 1) * step, left + (c + 1) * step, top - r * step)
            for r in range(n_side) for c in range(n_side)]


def run(config, features, out: Path, client) -> tuple[float, float, object]:
    from pixels_xr.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_batch(config, features, str(out), client=client, progress=False)
    return time.perf_counter() - t0, time.process_time() - c0, report


def _setup(n_max: int):
    """The sample holding the largest square, the config, and the top-left origin of the squares."""
    import pixels_xr as px
    from pixels_xr.testing.sample import make_sample

    WORK.mkdir(parents=True, exist_ok=True)
    # the sample must hold the largest square (and its 8 px margin): one tile of side ≥ 256 px
    need = max(256, PX * int(round(n_max ** 0.5)) + 16)
    marker = WORK / f"sample-{need}.json"  # made once: remaking it rewrites files another run may be reading
    if marker.exists():
        sample = SimpleNamespace(**json.loads(marker.read_text()))
    else:
        made = make_sample(WORK / f"sample-{need}", width=need, height=need, tiles=1)
        sample = SimpleNamespace(catalog=str(made.catalog), crs=made.crs, bounds=tuple(made.bounds))
        marker.write_text(json.dumps(vars(sample)))
    config = px.load_config({"start": "2021-11-01", "end": "2022-10-31", "mode": "composite",
                             "composite_method": "median", "interval": "months", "platforms": "SENTINEL_2",
                             "bands": ["red", "green", "blue", "nir"], "catalog": str(sample.catalog)})
    left, _, _, top = sample.bounds
    return need, sample, config, (left + 8 * RES, top - 8 * RES)


def _small(sample, origin, n: int) -> list:
    from shapely.geometry import box

    from pixels_xr.features import Feature

    side = int(round(n ** 0.5))
    assert side * side == n, f"{n} is not a perfect square"
    return [Feature(f"f{k:05d}", box(*b), crs=sample.crs) for k, b in enumerate(squares(origin, side, PX))]


def child_run(n: int, out: Path) -> None:
    """One N-feature run into ``out`` on its own local cluster; prints one JSON line of measurements."""
    import resource
    import threading

    import psutil

    from pixels_xr.batch import run_batch
    from pixels_xr.cluster import open_client

    _, sample, config, origin = _setup(n)
    features = _small(sample, origin, n)
    samples: list[list[int]] = []
    stop = threading.Event()
    with open_client("local", quiet=True) as client:
        def watch() -> None:
            while not stop.wait(2.0):
                try:
                    samples.append(sorted(client.run(lambda: psutil.Process().memory_info().rss).values()))
                except Exception:  # noqa: BLE001 - a sample lost while the cluster is busy or closing
                    pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0, c0 = time.perf_counter(), time.process_time()
        report = run_batch(config, features, str(out), client=client, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stop.set()
        watcher.join()
    print("RESULT " + json.dumps({
        "wall": wall, "cpu": cpu, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_mb": [[r / 2**20 for r in s] for s in samples], "ok": report.ok,
        "written": report.units_written, "skipped": report.units_skipped, "summary": report.summary()}),
        flush=True)


def _child(n: int, out: Path, *, kill_at: int | None = None) -> dict:
    """``child_run`` in a new process group; with ``kill_at``, SIGKILLed once that many unit markers exist."""
    import signal

    cmd = [sys.executable, __file__, "--child", str(n), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    if kill_at is not None:
        while proc.poll() is None and _markers(out) < kill_at:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)  # the workers' process group goes with it
        return {"killed_at": _markers(out)}
    stdout, _ = proc.communicate()
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _markers(out: Path) -> int:
    """Finished units recorded in ``out``'s ledger (job records, templates and unit files, as a re-run reads
    them); 0 before the ledger exists."""
    from pixels_xr.ledger import RunManifest

    if not (out / ".pixels_xr").is_dir():
        return 0
    ledger = RunManifest(str(out), "{}", "zarr3")
    return sum(len(ledger.unit_records(fid)) for fid in ledger.features())


def at_scale(n: int, write: bool, kill: bool = True) -> None:
    """The ``--scale`` measurements (module docstring)."""
    import pixels_xr as px

    before = machine_state()
    need, sample, _, origin = _setup(n)
    full_out, killed_out = WORK / f"scale-{n}.zarr", WORK / f"scale-{n}-killed.zarr"
    for out in (full_out, killed_out):
        shutil.rmtree(out, ignore_errors=True)
    full = _child(n, full_out)
    print("full", {k: v for k, v in full.items() if k != "workers_mb"}, flush=True)
    noop = _child(n, full_out)
    print("no-op", noop["wall"], noop["written"], flush=True)
    total = full["written"]
    if kill:
        killed = _child(n, killed_out, kill_at=total // 2)
        resumed = _child(n, killed_out)
        print("killed at", killed, "resumed wrote", resumed["written"], flush=True)
        features = _small(sample, origin, n)
        equal = all(
            all(np.array_equal(a[v].values, b[v].values, equal_nan=True) for v in a.data_vars)
            for f in features[:: max(1, n // 200)]
            for a, b in [(px.open_feature(str(full_out), f.id).compute(),
                          px.open_feature(str(killed_out), f.id).compute())])
    workers = full["workers_mb"]
    w_first, w_peak, w_last = (max(workers[0]) if workers else 0, max((max(s) for s in workers), default=0),
                               max(workers[-1]) if workers else 0)
    rows = [
        ["full run", f"{full['wall']:.1f}", f"{full['cpu'] / n * 1000:.1f}", f"{full['maxrss_mb']:.0f}",
         f"{w_first:.0f} / {w_peak:.0f} / {w_last:.0f}", str(full["written"]), str(full["ok"])],
        ["no-op re-run", f"{noop['wall']:.1f}", f"{noop['cpu'] / n * 1000:.1f}", f"{noop['maxrss_mb']:.0f}", "",
         str(noop["written"]), str(noop["ok"])],
    ]
    if kill:
        rows.append([f"re-run after SIGKILL at {killed['killed_at']} of {total} units", f"{resumed['wall']:.1f}",
                     f"{resumed['cpu'] / n * 1000:.1f}", f"{resumed['maxrss_mb']:.0f}", "",
                     str(resumed["written"]), str(resumed["ok"])])
    after = machine_state()
    lines = [
        f"## Many small features at scale: {n:,} fields of 20 × 20 px",
        "",
        f"`.venv/bin/python benchmarks/bench_many_features.py --scale {n}{'' if kill else ' --no-kill'}` — the sample (36 dates, one {need}² px "
        "tile), monthly median over a year (12 bins), 4 bands, Zarr; every run is a child process with its own "
        "`open_client(\"local\")` (2 workers). Client RSS: the child's peak (it also hosts the scheduler).",
        f"Machine before: {before}; after: {after}.",
        "",
        *table(["run", "wall s", "client CPU ms/feature", "client peak RSS MB (goal ≤ 1024)",
                "largest worker RSS MB: first / peak / last sample", "units written", "ok"], rows),
        "",
        f"- no-op re-run ≤ 30 s: {noop['wall']:.1f} s ({'met' if noop['wall'] <= 30 else 'NOT met'})",
        f"- client RSS ≤ 1 GB: {full['maxrss_mb']:.0f} MB ({'met' if full['maxrss_mb'] <= 1024 else 'NOT met'})",
    ]
    if kill:
        missing = total - killed["killed_at"]
        lines.append(f"- the re-run after the kill computed {resumed['written']} units; missing after the kill: "
                     f"{missing} ({'exactly the missing ones' if resumed['written'] == missing else 'NOT the missing ones'}"
                     f"); its store equals the uninterrupted run's on every {max(1, n // 200)}th feature: "
                     f"{'yes' if equal else 'NO'}")
    publish("many-features-scale", lines, write=write)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_run(int(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="100", help="feature counts N (perfect squares), comma-separated")
    ap.add_argument("--scale", type=int, default=None, help="the at-scale runs of N features instead")
    ap.add_argument("--no-kill", action="store_true", help="--scale: the full and no-op runs only")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args()
    if args.scale is not None:
        at_scale(args.scale, write=not args.no_write, kill=not args.no_kill)
        return
    counts = [int(c) for c in args.counts.split(",")]

    from shapely.geometry import box

    import pixels_xr as px
    from pixels_xr.cluster import open_client
    from pixels_xr.features import Feature

    need, sample, config, origin = _setup(max(counts))
    rows = []
    before = machine_state()
    with open_client("local", quiet=True) as client:
        px.run_batch(config, [Feature("warm", box(*squares(origin, 1, PX)[0]), crs=sample.crs)],
                     str(WORK / "warm.zarr"), client=client, progress=False, overwrite=True)  # imports, numba, GDAL
        for n in counts:
            side = int(round(n ** 0.5))
            assert side * side == n, f"{n} is not a perfect square"
            big = Feature("big", box(*squares(origin, 1, PX * side)[0]), crs=sample.crs)
            t1, c1, r1 = run(config, [big], WORK / f"one-{n}.zarr", client)
            small = _small(sample, origin, n)
            profiler = None
            if args.profile is not None and n == max(counts):
                spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                profiler = subprocess.Popen([spy, "record", "-o", str(args.profile), "-f", "raw", "-r", "50",
                                             "--pid", str(os.getpid())], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                time.sleep(1)
            tn, cn, rn = run(config, small, WORK / f"many-{n}.zarr", client)
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(timeout=60)
            assert r1.ok and rn.ok, (r1.summary(), rn.summary())
            whole = px.open_feature(str(WORK / f"one-{n}.zarr"), "big").compute()
            equal = True
            for k, f in enumerate(small[: min(n, 25)]):
                part = px.open_feature(str(WORK / f"many-{n}.zarr"), f.id).compute()
                r, c = divmod(k, side)
                window = whole.isel(y=slice(r * PX, (r + 1) * PX), x=slice(c * PX, (c + 1) * PX))
                equal &= all(np.array_equal(part[v].values, window[v].values, equal_nan=True)
                             for v in ("red", "nir", "clear_count"))
            rows.append([str(n), f"{t1:.1f}", f"{tn:.1f}", f"{tn / t1:.1f}×", f"{c1 * 1000:.0f}",
                         f"{cn / n * 1000:.0f}", "yes" if equal else "NO"])
            print(rows[-1], flush=True)
    after = machine_state()
    lines = [
        "## Many small features: N × 20 × 20 px vs one feature of the same pixels",
        "",
        f"`.venv/bin/python benchmarks/bench_many_features.py --counts {args.counts}` — the sample "
        f"(36 dates, one {need}² px tile), monthly median over a year (12 bins), 4 bands, Zarr, `run_batch` on one "
        "`open_client(\"local\")` cluster for every run. Client CPU: this process's CPU time during the run.",
        f"Machine before: {before}; after: {after}.",
        "",
        *table(["N", "one feature: wall s", "N features: wall s", "ratio (goal ≤ 3×)",
                "one feature: client ms", "N features: client ms/feature (goal ≤ 10)",
                "outputs equal where they overlap"], rows),
    ]
    publish("many-features", lines, write=not args.no_write)
    (WORK / "last.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
