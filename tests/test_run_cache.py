"""The per-run memo: a local catalog parsed once per batch run, fresh reads outside a run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import shapely

from pixels_xr.catalog import _search_raw
from pixels_xr.config import load_config
from pixels_xr.run_cache import memo, run_cache


def test_memo_only_inside_a_run_and_nested_runs_share_it() -> None:
    calls = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    assert memo("k", 1, compute) == 1 and memo("k", 1, compute) == 2  # no run: computed every time
    with run_cache():
        assert memo("k", 1, compute) == 3
        with run_cache():
            assert memo("k", 1, compute) == 3 and memo("k", 2, compute) == 4
        assert memo("k", 2, compute) == 4  # the inner run did not drop the outer one's memo
    assert memo("k", 1, compute) == 5


def test_threads_share_one_value() -> None:
    results = []
    with run_cache():
        threads = [threading.Thread(target=lambda: results.append(memo("t", "x", object))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len({id(r) for r in results}) == 1


def test_local_catalog_read_once_per_run(tmp_path: Path) -> None:
    path = tmp_path / "items.json"

    def write(n: int) -> None:
        items = [{"type": "Feature", "stac_version": "1.0.0", "id": f"i{k}", "properties": {
            "datetime": "2022-01-01T00:00:00Z"}, "geometry": None, "bbox": [0, 0, 1, 1], "assets": {},
            "links": []} for k in range(n)]
        path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))

    write(2)
    config = load_config({"start": "2022-01-01", "end": "2022-01-31", "catalog": str(path),
                          "platforms": "SENTINEL_2", "bands": ["red"], "mode": "all"})
    args = (config, shapely.box(0, 0, 1, 1), config.start, config.end)
    with run_cache():
        assert len(_search_raw(*args)[0]) == 2
        write(3)
        assert len(_search_raw(*args)[0]) == 2  # parsed once for the whole run
    assert len(_search_raw(*args)[0]) == 3  # outside a run the file is read as it is now


def test_a_key_is_computed_once_while_others_wait_and_failures_are_not_kept() -> None:
    """Two planning threads reading one local catalog at once walked it twice concurrently (pystac is not
    safe for that): now the second waits for the first's result."""
    import time

    calls = []
    gate = threading.Event()

    def slow() -> str:
        calls.append(1)
        gate.wait(5)
        time.sleep(0.05)
        return "parsed"

    with run_cache():
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(memo("cat", "p", slow))) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        gate.set()
        for t in threads:
            t.join()
        assert results == ["parsed"] * 6 and len(calls) == 1

        def boom() -> str:
            raise OSError("flaky")

        for _ in range(2):
            try:
                memo("cat", "q", boom)
            except OSError:
                pass
        assert memo("cat", "q", lambda: "ok") == "ok"  # the failure was not remembered
