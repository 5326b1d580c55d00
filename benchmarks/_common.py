"""Helpers shared by the pipeline benchmarks: timing, machine state, graph materialisation, RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


def measure(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, float, Any]:
    """(wall-clock seconds, CPU seconds of this process's threads) of the fastest of ``repeat`` runs, and
    the last result. CPU time suffers less than wall time from other users of a shared machine."""
    best, cpu, result = float("inf"), float("nan"), None
    for _ in range(repeat):
        result = None  # the previous run's result is not the next run's memory to work around
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, cpu = wall, used
    return best, cpu, result


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """(best wall-clock seconds of ``repeat`` runs, last result)."""
    wall, _, result = measure(fn, repeat)
    return wall, result


def materialise(*collections: Any) -> dict:
    """The low-level task graph ``dask.compute`` would hand to a scheduler: expression optimised, every layer
    expanded into tasks (dask's own ``compute`` path up to the scheduler call)."""
    from dask._expr import FinalizeCompute
    from dask._task_spec import convert_legacy_graph
    from dask.base import collections_to_expr

    expr = FinalizeCompute(collections_to_expr(list(collections))).optimize()
    return convert_legacy_graph(expr.__dask_graph__())


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) so far of these processes and all their children."""
    import psutil

    procs: dict[int, Any] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    total = 0.0
    for p in procs.values():  # each process once, though it may be a child of another listed
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def worker_pids(client: Any) -> list[int]:
    """A Dask cluster's worker processes and their nannies (local clusters)."""
    import psutil

    pids = set(client.run(os.getpid).values())
    return sorted(pids | {psutil.Process(p).ppid() for p in pids})


def machine_state() -> str:
    """One line: CPU, core count, load averages (the machine is shared: timings are noisy)."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load} (1/5/15 min)")


def update_results(tag: str, section: str) -> None:
    """Replace the ``<!-- tag -->`` … ``<!-- /tag -->`` section of RESULTS.md (append it when missing)."""
    begin, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def publish(tag: str, lines: list[str], write: bool = True) -> None:
    """Print a results section and, unless ``write`` is false, store it in RESULTS.md under ``tag``."""
    section = "\n".join(lines)
    print(section)
    if write:
        update_results(tag, section)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *["| " + " | ".join(row) + " |" for row in rows]]
