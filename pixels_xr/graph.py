"""Dask graphs written by hand: the one seam over dask's private task spec, and one task per output block.

Modules that write graphs directly (``cube`` reads, ``compose`` reductions, ``io.zarr_store`` writes) take
``Task``, ``TaskRef``, ``List``, ``DataNode`` and ``HighLevelGraph`` from here, and submit plain graphs
through ``submittable``, so a change of dask's ``_task_spec`` or ``_expr`` touches this file only.

One task per output block: a lazy Dataset from ``compose`` costs about 25 small tasks per output block once written (read, mask,
reduce, one ``getitem`` and one store per variable, their concatenations). On a cluster every task is
scheduler and client time, and on a small machine that time is taken from the workers. ``block_graph``
regroups such a graph: each block's consumer (e.g. a Zarr write of all variables of the block) becomes one
task that runs, inside itself, every task that no other block needs; tasks several blocks need (shared
reader tables, neighbours of an overlap) stay separate and are computed once, as before.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from dask._expr import LLGExpr
from dask._task_spec import DataNode, GraphNode, List, Task, TaskRef
from dask.base import collections_to_expr, tokenize
from dask.highlevelgraph import HighLevelGraph

__all__ = ["DataNode", "GraphNode", "HighLevelGraph", "List", "Task", "TaskRef", "block_graph", "culled",
           "materialized", "submittable"]

Key = Hashable


def block_graph(arrays: Sequence[Any], blocks: Iterable[tuple[int, ...]], consume: Callable[..., Any],
                args: tuple = (), name: str = "pixels-block") -> tuple[dict, list[Key]]:
    """A graph with one task per block index: ``consume(block_index, [block of each array], *args)``.

    ``arrays`` are dask arrays with the same chunk grid. Returns the graph (plain dict of dask tasks) and
    the consumer keys in block order; compute them with ``dask.delayed``/``Client.get`` on the graph.
    """
    blocks = [tuple(b) for b in blocks]
    dsk = materialized(arrays)
    prefix = f"{name}-{tokenize([a.name for a in arrays], blocks, consume, args)}"
    closures = {b: _closure(dsk, [(a.name, *b) for a in arrays]) for b in blocks}
    shared = {k for k, n in Counter(k for c in closures.values() for k in c).items() if n > 1}
    graph: dict[Key, GraphNode] = {k: dsk[k] for k in shared}
    keys = []
    for b in blocks:
        key = (prefix, *b)
        outs = List(*(TaskRef((a.name, *b)) for a in arrays))
        consumer = Task(key, consume, DataNode(None, b), outs, *args)
        graph[key] = Task.fuse(*(dsk[k] for k in closures[b] if k not in shared), consumer, key=key)
        keys.append(key)
    return graph, keys


def materialized(arrays: Sequence[Any]) -> dict[Key, GraphNode]:
    """The optimised graph of dask arrays as a plain dict of tasks, their block keys unchanged (optimised
    as ``dask.compute`` does: without ``.optimize()`` blockwise fusion may recompute shared inputs)."""
    return dict(collections_to_expr(list(arrays), optimize_graph=True).optimize().__dask_graph__())


def submittable(dsk: dict[Key, GraphNode]) -> LLGExpr:
    """A plain graph as ``Client.get`` takes it, named by a random token instead of a hash of its tasks.

    Given a dict, ``Client.get`` wraps it in an expression whose name tokenizes every task (arguments that
    dask cannot hash, such as readers and write jobs, by pickling them): a quarter of the client's CPU of
    a small incremental run, for a name nothing reuses (our keys are unique per run already)."""
    return LLGExpr(dsk, _determ_token=uuid.uuid4().hex)


def culled(dsk: dict[Key, GraphNode], keys: Iterable[Key]) -> dict[Key, GraphNode]:
    """The part of ``dsk`` that ``keys`` need (blocks no consumer reads are neither sent nor computed)."""
    return {k: dsk[k] for k in _closure(dsk, list(keys))}


def _closure(dsk: dict[Key, Any], keys: list[Key]) -> set[Key]:
    """``keys`` and every key they depend on, transitively."""
    seen: set[Key] = set()
    stack = list(keys)
    while stack:
        key = stack.pop()
        if key in seen or key not in dsk:
            continue
        seen.add(key)
        stack.extend(dsk[key].dependencies)
    return seen
