"""Quicklook figures: the stretch, rendered pixels, titles and legends, one pixel's series, PNG output."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402

from pixels_xr import plot  # noqa: E402
from pixels_xr.errors import ConfigError, OutputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BANDS = ("red", "green", "blue")


def _dataset(values: dict[str, np.ndarray], *, source_time: np.ndarray | None = None,
             counts: np.ndarray | None = None, partial: list[bool] | None = None,
             empty: list[bool] | None = None) -> xr.Dataset:
    """A binned Dataset like ``collect``'s: monthly bins from 2022-01, 10 m pixels."""
    nt, ny, nx = next(iter(values.values())).shape
    starts = np.array([f"2022-{m + 1:02d}-01" for m in range(nt)], "datetime64[ns]")
    ends = np.array([f"2022-{m + 1:02d}-28" for m in range(nt)], "datetime64[ns]")
    data = {k: (("time", "y", "x"), v) for k, v in values.items()}
    if counts is not None:
        data["clear_count"] = (("time", "y", "x"), counts.astype(np.uint16))
    if source_time is not None:
        data["source_time"] = (("time", "y", "x"), source_time)
    return xr.Dataset(data, coords={
        "time": starts, "time_end": ("time", ends),
        "partial": ("time", np.array(partial or [False] * nt)),
        "empty": ("time", np.array(empty or [False] * nt)),
        "y": 1000.0 - 10.0 * np.arange(ny) - 5.0, "x": 500.0 + 10.0 * np.arange(nx) + 5.0},
        attrs={"feature": "f1", "mode": "latest_pixel"})


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _pixel_at(fig, ax, x: float, y: float) -> tuple[int, int, int]:
    """Rendered colour (0-255) of the figure at data coordinates (x, y) of ``ax``."""
    image = _render(fig)
    col, row = ax.transData.transform((x, y))
    return tuple(int(v) for v in image[image.shape[0] - 1 - int(round(row)), int(round(col))])


def _rgb255(colour) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in to_rgba(colour)[:3])


def _same_colour(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal up to the renderer's 8-bit rounding."""
    return max(abs(int(u) - int(v)) for u, v in zip(a, b)) <= 1


def test_stretch_maps_the_2nd_and_98th_percentiles_to_0_and_1_across_bins() -> None:
    rng = np.random.default_rng(1)
    red = rng.uniform(0.0, 0.5, (3, 20, 20)).astype(np.float32)
    red[1] += 0.3  # a brighter second bin: one shared stretch keeps it brighter
    red[0, :5] = np.nan
    ds = _dataset({"red": red, "green": red * 0.5, "blue": red * 0.25})
    limits = plot.stretch_limits(ds, BANDS)
    lo, hi = np.nanpercentile(red, [2, 98])
    assert limits["red"] == pytest.approx((lo, hi), rel=1e-6)
    assert limits["blue"] == pytest.approx(tuple(np.nanpercentile(red * 0.25, [2, 98])), rel=1e-6)
    rgba = plot.to_rgb(ds, BANDS)
    assert rgba.shape == (3, 20, 20, 4) and rgba.dtype == np.float32
    expected = np.clip((red - lo) / (hi - lo), 0, 1)
    valid = np.isfinite(red)
    np.testing.assert_allclose(rgba[..., 0][valid], expected[valid], atol=1e-6)
    # the 2nd percentile value maps to 0, the 98th to 1, a value half-way to 0.5
    flat = red[valid]
    k_lo, k_hi = np.argmin(np.abs(flat - lo)), np.argmin(np.abs(flat - hi))
    assert rgba[..., 0][valid][k_lo] == pytest.approx((flat[k_lo] - lo) / (hi - lo), abs=1e-6)
    assert abs(rgba[..., 0][valid][k_lo]) < 0.01 and abs(rgba[..., 0][valid][k_hi] - 1) < 0.01
    assert ((rgba[..., :3] >= 0) & (rgba[..., :3] <= 1)).all()
    # about 2 % of the valid values fall at or below the low limit, about 2 % at or above the high one
    assert 0.01 < (rgba[..., 0][valid] == 0).mean() < 0.03
    assert 0.01 < (rgba[..., 0][valid] == 1).mean() < 0.03
    # shared across bins: bin 1 is brighter than bin 0 after the stretch too
    assert np.nanmean(rgba[1, ..., 0]) > np.nanmean(rgba[0, 5:, :, 0]) + 0.3
    # nodata: transparent; valid: opaque
    assert (rgba[0, :5, :, 3] == 0).all() and (rgba[0, :5, :, :3] == 0).all()
    assert (rgba[0, 5:, :, 3] == 1).all()


def test_rendered_quicklook_pixels_black_white_and_nodata_grey() -> None:
    red = np.zeros((1, 10, 10), np.float32)
    red[:, :, 5:] = 1.0  # right half bright, left half dark
    red[:, 0, :] = np.nan  # a nodata row at the top
    ds = _dataset({b: red.copy() for b in BANDS})
    limits = {b: (0.0, 1.0) for b in BANDS}
    fig = plot.quicklook(ds, limits=limits)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), plot.to_rgb(ds, limits=limits)[0])
    assert _pixel_at(fig, ax, 520.0, 950.0) == (0, 0, 0)  # dark half → black
    assert _pixel_at(fig, ax, 580.0, 950.0) == (255, 255, 255)  # bright half → white
    # the nodata row shows the background
    assert _same_colour(_pixel_at(fig, ax, 550.0, 995.0), _rgb255(plot.NODATA_BACKGROUND))
    # georeferenced: the image spans the pixel edges
    assert ax.images[0].get_extent() == [500.0, 600.0, 900.0, 1000.0]


def test_raw_uint16_nodata_is_transparent_and_one_band_is_grey() -> None:
    dn = np.full((1, 4, 4), 2000, np.uint16)
    dn[0, 0, 0] = 0
    dn[0, 3, 3] = 4000
    ds = _dataset({"nir": dn})
    ds.nir.attrs["nodata"] = 0
    rgba = plot.to_rgb(ds, ["nir"], limits={"nir": (2000.0, 4000.0)})
    assert rgba[0, 0, 0, 3] == 0
    assert rgba[0, 1, 1].tolist() == [0, 0, 0, 1] and rgba[0, 3, 3].tolist() == [1, 1, 1, 1]
    assert plot.stretch_limits(ds, ["nir"], (0, 100)) == {"nir": (2000.0, 4000.0)}


def test_titles_flag_partial_and_empty_bins() -> None:
    values = np.random.default_rng(0).random((3, 5, 5)).astype(np.float32)
    values[2] = np.nan
    ds = _dataset({b: values for b in BANDS}, partial=[False, False, True], empty=[False, False, True])
    assert plot.bin_titles(ds) == ["2022-01-01 – 2022-01-28", "2022-02-01 – 2022-02-28",
                                   "2022-03-01 – 2022-03-28\n(partial, empty)"]
    fig = plot.quicklook(ds, ncols=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == plot.bin_titles(ds)
    assert len(fig.axes) == 4 and not fig.axes[3].get_visible()  # 2×2 grid, one spare panel hidden
    assert [t.get_text() for t in visible[2].texts] == ["no data"] and not visible[0].texts
    # mode "all": one acquisition day per slice, no time_end
    day = ds.drop_vars(["time_end", "partial", "empty"])
    assert plot.bin_titles(day)[0] == "2022-01-01"


def test_clear_count_map_colours_and_integer_colour_bar() -> None:
    counts = np.zeros((2, 6, 6), np.uint16)
    counts[0, :, 3:] = 2
    counts[1] = 4
    values = np.full((2, 6, 6), 0.1, np.float32)
    ds = _dataset({"red": values}, counts=counts)
    fig = plot.clear_count_map(ds)
    map_axes = [ax for ax in fig.axes if ax.images]
    bar = [ax for ax in fig.axes if not ax.images][0]
    np.testing.assert_array_equal(map_axes[0].images[0].get_array(), counts[0])
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0", "1", "2", "3", "4"]
    assert "clear observations" in bar.get_ylabel()
    image = map_axes[0].images[0]
    assert image.to_rgba(np.array([0]))[0].tolist() == [1, 1, 1, 1]  # 0: white
    assert _pixel_at(fig, map_axes[0], 510.0, 970.0) == (255, 255, 255)
    top = _rgb255(image.to_rgba(np.array([4]))[0])
    assert _same_colour(_pixel_at(fig, map_axes[1], 530.0, 970.0), top) and top != (255, 255, 255)
    mid = _rgb255(image.to_rgba(np.array([2]))[0])
    assert _same_colour(_pixel_at(fig, map_axes[0], 550.0, 970.0), mid) and mid not in (top, (255, 255, 255))


def test_source_time_map_legend_lists_each_bins_dates_in_its_colours() -> None:
    times = np.full((2, 4, 4), np.datetime64("NaT"), "datetime64[ns]")
    times[0, :2] = np.datetime64("2022-01-10")
    times[0, 2:] = np.datetime64("2022-01-20")
    times[1, :, :3] = np.datetime64("2022-02-05")
    ds = _dataset({"red": np.ones((2, 4, 4), np.float32)}, source_time=times)
    fig = plot.source_time_map(ds)
    ax0, ax1 = fig.axes[:2]
    labels0 = [t.get_text() for t in ax0.get_legend().get_texts()]
    assert labels0 == ["2022-01-10", "2022-01-20"]
    assert [t.get_text() for t in ax1.get_legend().get_texts()] == ["2022-02-05"]
    handles = ax0.get_legend().legend_handles
    for label, (x, y) in (("2022-01-10", (515.0, 995.0)), ("2022-01-20", (515.0, 965.0))):
        colour = handles[labels0.index(label)].get_facecolor()
        assert _same_colour(_pixel_at(fig, ax0, x, y), _rgb255(colour))
    assert _same_colour(_pixel_at(fig, ax1, 535.0, 965.0), _rgb255(plot.NODATA_BACKGROUND))  # NaT → nodata
    with pytest.raises(ConfigError, match="source_time"):
        plot.source_time_map(ds.drop_vars("source_time"))


def test_source_time_legend_is_bounded() -> None:
    times = np.array([np.datetime64("2022-01-01") + np.timedelta64(d, "D") for d in range(12)],
                     "datetime64[ns]").reshape(1, 3, 4)
    ds = _dataset({"red": np.ones((1, 3, 4), np.float32)}, source_time=times)
    ax = plot.source_time_map(ds, max_legend=10).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"2022-01-{d:02d}" for d in range(1, 10)] + ["… 3 more"]
    colours = ax.images[0].cmap(np.arange(12))
    assert len({tuple(c) for c in colours}) == 12  # every date its own colour


def test_pixel_series_marks_the_observation_each_bin_used() -> None:
    nir = np.array([0.2, 0.3, np.nan], np.float32).reshape(3, 1, 1) * np.ones((3, 2, 2), np.float32)
    times = np.broadcast_to(np.array(["2022-01-17", "2022-02-03", "NaT"], "datetime64[ns]")[:, None, None],
                            (3, 2, 2)).copy()
    ds = _dataset({"nir": nir}, source_time=times)
    obs = xr.Dataset({"nir": ("time", np.array([0.21, 0.2, 0.5, 0.3], np.float32)),
                      "clear": ("time", np.array([True, True, False, True]))},
                     coords={"time": np.array(["2022-01-05", "2022-01-17", "2022-01-30", "2022-02-03"],
                                              "datetime64[ns]")})
    fig = plot.pixel_series(ds, 505.0, 995.0, "nir", observations=obs)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    used = lines["observation used"]
    assert list(used.get_ydata()) == pytest.approx([0.2, 0.3])
    np.testing.assert_array_equal(np.asarray(used.get_xdata(), "datetime64[ns]"),
                                  np.array(["2022-01-17", "2022-02-03"], "datetime64[ns]"))
    assert list(lines["clear observation"].get_ydata()) == pytest.approx([0.21, 0.2, 0.3])
    assert list(lines["not clear (masked)"].get_ydata()) == pytest.approx([0.5])
    segments = ax.collections[0].get_segments()  # one segment per bin across the bin
    assert len(segments) == 3 and segments[0][0][1] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="outside") as err:
        plot.pixel_series(ds, 1e6, 995.0, "nir")
    assert err.value.where == "x"
    with pytest.raises(ConfigError) as err:
        plot.quicklook(ds, ("red", "green", "blue"))
    assert err.value.where == "bands" and "'red' is not a variable" in str(err.value)


def test_without_matplotlib_the_cli_says_which_extra_in_one_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pixels_xr.cli import app

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    res = CliRunner().invoke(app, ["quicklook", str(tmp_path / "run.zarr")])
    assert res.exit_code == 1
    assert res.output.strip() == "error: plot: plots need matplotlib: pip install 'pixels-xr[plot]'"
    ds = _dataset({b: np.ones((1, 2, 2), np.float32) for b in BANDS})
    for draw in (plot.quicklook, plot.clear_count_map, plot.source_time_map):
        with pytest.raises(ConfigError, match="plot extra|pixels-xr\\[plot\\]"):
            draw(ds)


def test_bad_arguments_name_their_field() -> None:
    ds = _dataset({b: np.ones((1, 2, 2), np.float32) for b in BANDS})
    with pytest.raises(ConfigError) as err:
        plot.stretch_limits(ds, BANDS, (98, 2))
    assert err.value.where == "percentiles"
    with pytest.raises(ConfigError) as err:
        plot.to_rgb(ds, ["red", "green"])
    assert err.value.where == "bands"


# ------------------------------------------------------------------------ the real pipeline on the sample
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pixels_xr.config import load_config
    from pixels_xr.features import load_features
    from pixels_xr.testing.sample import make_sample

    root = tmp_path_factory.mktemp("plot")
    info = make_sample(root / "sample", n_dates=18, width=64, height=64)
    features = load_features(info.features)
    configs = {}
    for name in ("sample_monthly_latest_pixel", "sample_bimonthly_composite"):
        data = json.loads((REPO / "configs" / f"{name}.json").read_text())
        configs[name] = load_config({**data, "catalog": str(info.catalog), "end": "2022-04-30"})
    return {"root": root, "features": features, "configs": configs}


def test_pixel_observations_explain_latest_pixel_and_median_values(sample_run: dict) -> None:
    """Each latest-pixel value is the newest clear observation of its bin; each median the clear median."""
    from pixels_xr.compose import collect

    feature = sample_run["features"][1]
    for name, cfg in sample_run["configs"].items():
        ds = collect(cfg, feature).compute()
        x, y = float(ds.x.values[len(ds.x) // 2]), float(ds.y.values[len(ds.y) // 3])
        obs = plot.pixel_observations(cfg, feature, x, y)
        assert obs.attrs["x"] == x and obs.attrs["y"] == y and obs.clear.dtype == bool
        assert obs.sizes["time"] >= 6 and obs.clear.any() and not obs.clear.all()
        px = ds.sel(x=x, y=y)
        checked = 0
        for k in range(ds.sizes["time"]):
            start, end = px.time.values[k], px.time_end.values[k] + np.timedelta64(1, "D")
            inside = (obs.time.values >= start) & (obs.time.values < end) & obs.clear.values
            value = float(px.nir.values[k])
            if not inside.any():
                assert np.isnan(value) and int(px.clear_count.values[k]) == 0
                continue
            checked += 1
            assert int(px.clear_count.values[k]) == inside.sum()
            if "source_time" in px:
                newest = obs.time.values[inside].max()
                assert px.source_time.values[k] == newest
                assert value == pytest.approx(float(obs.nir.values[obs.time.values == newest][0]), abs=1e-6)
            else:
                assert value == pytest.approx(float(np.median(obs.nir.values[inside])), abs=1e-6)
        assert checked >= 2
        fig = plot.pixel_series(ds, x, y, observations=obs)
        labels = [line.get_label() for line in fig.axes[0].lines]
        assert "observation used" in labels and "clear observation" in labels


def test_quicklook_cli_writes_pngs_of_a_zarr_store(sample_run: dict, tmp_path: Path) -> None:
    from matplotlib.image import imread
    from typer.testing import CliRunner

    from pixels_xr.cli import app
    from pixels_xr.compose import collect

    from distributed import Client

    from pixels_xr.batch import run_batch

    store = tmp_path / "run.zarr"
    cfg = sample_run["configs"]["sample_monthly_latest_pixel"]
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        report = run_batch(cfg, sample_run["features"][:2], str(store), client=client, progress=False)
    assert report.ok, report.failed
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's non-Zarr folders (manifest, STAC) are not a problem
        res = runner.invoke(app, ["quicklook", str(store), "--out", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output
    stored = xr.open_zarr(store, group="field-2", consolidated=False)
    local = collect(cfg, sample_run["features"][1]).compute()
    np.testing.assert_array_equal(stored.red.values, local.red.values)  # the quicklook shows the real run
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == sorted(f"{f}_{k}.png" for f in ("field-1", "field-2")
                           for k in ("rgb", "clear_count", "source_time"))
    image = imread(tmp_path / "png" / "field-2_rgb.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image[..., :3].std() > 0.05  # a real picture
    res = runner.invoke(app, ["quicklook", str(store), "--feature", "field-2", "--out",
                              str(tmp_path / "one")])
    assert res.exit_code == 0 and len(list((tmp_path / "one").iterdir())) == 3
    res = runner.invoke(app, ["quicklook", str(store), "--feature", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1
    assert "--feature: no feature 'nope' in the store (have field-1, field-2)" in res.output
    res = runner.invoke(app, ["quicklook", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 1 and "missing.zarr: not a Zarr store" in res.output
    with pytest.raises(OutputError):
        plot.store_features(str(tmp_path / "png"))
