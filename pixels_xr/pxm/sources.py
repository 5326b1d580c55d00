"""PXM source images: open (S3 via GDAL /vsis3/), apply bidx and crs, and read RGB with one validity mask.

One mask per source, chosen by this precedence (first that applies wins):

1. ``alpha``  - an alpha band: the 4th ``bidx`` band, else the band whose colour interpretation is alpha;
2. ``mask``   - a GDAL per-dataset mask (internal mask or external ``.msk`` sidecar);
3. ``ndv``    - the manifest's ``ndv`` (overrides nodata metadata);
4. ``nodata`` - the file's nodata metadata;
5. ``none``   - every pixel is valid.

With ``ndv``/``nodata`` a pixel is nodata only when *all three* RGB bands equal their nodata values (GDAL
semantics), never band by band. Alpha and mask pixels are valid where non-zero. S3 credentials and endpoint
come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_S3_ENDPOINT``, ``AWS_HTTPS``, ...), read by GDAL.

Every source is opened here, by ``validate --check-sources`` and by ``render`` alike, and only with the
GDAL drivers in ``SOURCE_DRIVERS`` (GeoTIFF, JPEG 2000): a VRT (or any other format) named ``.tif`` would
otherwise read whatever local file or URL it points to. A source may declare at most ``MAX_PIXELS``
pixels (width × height; ``max_pixels`` / ``--max-pixels`` to change it): a tiny file can declare 10^6 ×
10^6 pixels, and everything after the open (checks, tile planning) scales with what it declares. Errors
raised here carry GDAL's message as text, never a chained GDAL exception (those do not survive pickling
from a Dask worker).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio._err import CPLE_BaseError
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from pixels_xr.errors import SourceError

__all__ = [
    "LOSSY_COMPRESSIONS",
    "GDAL_ERRORS",
    "MAX_PIXELS",
    "SOURCE_DRIVERS",
    "gdal_message",
    "MaskKind",
    "SourceHandle",
    "gdal_path",
    "nodata_fringe",
    "open_source",
    "read_source",
]

MaskKind = Literal["alpha", "mask", "ndv", "nodata", "none"]

#: GTiff compressions that are lossy unless GDAL says otherwise (WEBP_LOSSLESS, JXL_LOSSLESS, LERC 0 error).
LOSSY_COMPRESSIONS = frozenset({"JPEG", "YCBCR JPEG", "WEBP", "JXL", "LERC", "LERC_DEFLATE", "LERC_ZSTD"})
#: The only GDAL drivers a source is opened with (the PXM spec's GeoTIFF and JPEG 2000).
SOURCE_DRIVERS: tuple[str, ...] = ("GTiff", "JP2OpenJPEG")
#: Default limit on the pixels (width × height) a source may declare: 2^31, about 46341² px (6.4 GB of RGB).
#: Above the 31000² px that ``--check-sources`` accepts per side, so no checked source is refused, and far
#: below the 10^12 px a 700 KB sparse GeoTIFF can declare.
MAX_PIXELS = 2**31
#: What GDAL raises through rasterio: its own errors, the CPLE_* errors chained under them, OS errors.
GDAL_ERRORS: tuple[type[BaseException], ...] = (RasterioError, CPLE_BaseError, OSError, MemoryError)
_PROBE_SIDE = 1024  # at most this many pixels per side in each block read by SourceHandle.probe()


def gdal_message(err: BaseException) -> str:
    """One line from a rasterio/GDAL error and the GDAL errors chained under it (most specific last)."""
    msgs: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = " ".join(str(e).split())
        if text and "See previous exception" not in text and text not in msgs:
            msgs.append(text)
        e = e.__cause__ or e.__context__
    if not msgs:
        return type(err).__name__
    return msgs[0] if len(msgs) == 1 else f"{msgs[0]} ({msgs[-1]})"


def gdal_path(uri: str) -> str:
    """GDAL path of a source: ``s3://bucket/key`` -> ``/vsis3/bucket/key``; other paths unchanged."""
    if uri.startswith("s3://"):
        return "/vsis3/" + uri[len("s3://") :]
    return uri


def _info_get(info: Any, name: str) -> Any:
    if info is None:
        return None
    if isinstance(info, dict):
        return info.get(name)
    return getattr(info, name, None)


def _compression(ds: rasterio.DatasetReader) -> tuple[str | None, bool]:
    """(compression name, lossy?) from GDAL's IMAGE_STRUCTURE metadata."""
    tags = {k.upper(): str(v).upper() for k, v in ds.tags(ns="IMAGE_STRUCTURE").items()}
    if ds.driver.startswith("JP2"):
        rev = tags.get("COMPRESSION_REVERSIBILITY", "")
        return "JPEG2000 " + (rev or "unknown"), not rev.startswith("LOSSLESS")
    comp = tags.get("COMPRESSION")
    if comp is None:
        return None, ds.driver == "JPEG"
    lossy = comp in LOSSY_COMPRESSIONS
    if comp == "WEBP" and tags.get("WEBP_LOSSLESS") == "TRUE":
        lossy = False
    if comp == "JXL" and tags.get("JXL_LOSSLESS", "YES") in ("YES", "TRUE"):
        lossy = False
    if comp.startswith("LERC") and float(tags.get("MAX_Z_ERROR", "0") or 0) == 0:
        lossy = False
    return comp, lossy


@dataclass
class SourceHandle:
    """An open PXM source: the rasterio ``dataset``, the RGB band indexes, the mask in use and the CRS.

    ``read()`` returns ``(rgb, valid)``: rgb (3, h, w) uint8 and valid (h, w) bool. Close it (or use it as
    a context manager) when done.
    """

    uri: str
    dataset: rasterio.DatasetReader
    bidx: tuple[int, int, int]
    alpha_band: int | None
    mask_kind: MaskKind
    ndv: tuple[int, int, int] | None
    crs: CRS | None
    compression: str | None
    lossy: bool
    mask_flags: tuple[tuple[MaskFlags, ...], ...] = field(repr=False)

    @property
    def path(self) -> str:
        return gdal_path(self.uri)

    @property
    def width(self) -> int:
        return self.dataset.width

    @property
    def height(self) -> int:
        return self.dataset.height

    @property
    def transform(self) -> rasterio.Affine:
        return self.dataset.transform

    @property
    def georeferenced(self) -> bool:
        """Whether the file has a geotransform (not GDAL's identity default) or GCPs."""
        return self.dataset.transform != rasterio.Affine.identity() or bool(self.dataset.gcps[0])

    def read(
        self,
        window: Window | None = None,
        out_shape: tuple[int, int] | None = None,
        resampling: Resampling = Resampling.nearest,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read ``(rgb (3,h,w) uint8, valid (h,w) bool)`` for a window (default whole image).

        ``out_shape`` (h, w) resamples on read; keep ``nearest`` (the default) whenever the mask comes from
        ``ndv``/``nodata``, which is decided on the values read.
        """
        ds = self.dataset
        shape = None if out_shape is None else (3, *out_shape)
        try:
            rgb = ds.read(list(self.bidx), window=window, out_shape=shape, resampling=resampling)
            mshape = None if out_shape is None else tuple(out_shape)
            if self.mask_kind == "alpha":
                valid = ds.read(self.alpha_band, window=window, out_shape=mshape, resampling=Resampling.nearest) > 0
            elif self.mask_kind == "mask":
                valid = ds.read_masks(self.bidx[0], window=window, out_shape=mshape,
                                      resampling=Resampling.nearest) > 0
            elif self.mask_kind in ("ndv", "nodata"):
                assert self.ndv is not None
                nd = np.asarray(self.ndv, dtype=np.uint8).reshape(3, 1, 1)
                valid = ~np.all(rgb == nd, axis=0)
            else:
                valid = np.ones(rgb.shape[1:], dtype=bool)
        except GDAL_ERRORS as err:
            failure = f"cannot read: {gdal_message(err)}"
        else:
            return rgb.astype(np.uint8, copy=False), valid
        raise SourceError(failure, where=self.uri)  # outside the handler: no GDAL exception chained

    def probe(self) -> None:
        """Read the last block of every band used, and of the mask, at full resolution and at every overview
        level: a few blocks, and enough to catch a truncated file (whatever GDAL wrote last is missing).

        Raises :class:`SourceError` ("cannot read data: ...") naming the level that failed.
        """
        bands = list(self.bidx) + ([self.alpha_band] if self.alpha_band else [])
        levels = len(self.dataset.overviews(self.bidx[0]))
        failure = None
        for level in range(-1, levels):
            try:
                ds = self.dataset if level < 0 else _open_dataset(self.uri, self.dataset.driver, level)
            except SourceError as err:
                failure = f"overview {level + 1} of {levels}: {err.message}"
                break
            try:
                window = _last_window(ds, bands[0])
                ds.read(bands, window=window)
                if self.mask_kind == "mask":
                    ds.read_masks(self.bidx[0], window=window)
            except GDAL_ERRORS as err:
                where = "full resolution" if level < 0 else f"overview {level + 1} of {levels}"
                failure = f"cannot read data at {where} (truncated or corrupt file?): {gdal_message(err)}"
            finally:
                if level >= 0:
                    ds.close()
            if failure:
                break
        if failure:
            raise SourceError(failure, where=self.uri)

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> SourceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_triplet(value: Any) -> tuple[int, int, int] | None:
    """ndv as given in a manifest ("[255, 255, 255]", a list, or an already-parsed tuple)."""
    if value is None:
        return None
    if isinstance(value, str):
        import json

        value = json.loads(value)
    return (int(value[0]), int(value[1]), int(value[2]))


def _parse_bidx(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(","))
    return tuple(int(v) for v in value)


def _last_window(ds: rasterio.DatasetReader, band: int) -> Window:
    """The last block of ``band`` (bottom right), at most ``_PROBE_SIDE`` pixels per side."""
    bh, bw = ds.block_shapes[band - 1]
    row0, col0 = (ds.height - 1) // bh * bh, (ds.width - 1) // bw * bw
    row0, col0 = max(row0, ds.height - _PROBE_SIDE), max(col0, ds.width - _PROBE_SIDE)
    return Window(col0, row0, ds.width - col0, ds.height - row0)


def _open_dataset(uri: str, driver: str | None = None, overview_level: int | None = None) -> rasterio.DatasetReader:
    """Open with one of ``SOURCE_DRIVERS`` only (the one the extension names first); SourceError otherwise."""
    path = gdal_path(uri)
    jp2 = path.lower().endswith(".jp2")
    drivers = [driver] if driver else sorted(SOURCE_DRIVERS, key=lambda d: d.startswith("JP2") != jp2)
    kwargs = {} if overview_level is None else {"overview_level": overview_level}
    failure = None
    for name in drivers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(path, driver=name, **kwargs)
        except GDAL_ERRORS as err:
            message = gdal_message(err)
            if "not recognized as being in" not in message:
                failure = f"cannot open: {message}"
                break
    if failure is None:
        failure = (f"cannot open: not a GeoTIFF or JPEG 2000 file (sources are opened with the GDAL drivers"
                   f" {', '.join(SOURCE_DRIVERS)} only)")
    raise SourceError(failure, where=uri)


def open_source(
    uri: str,
    info: Any = None,
    *,
    bidx: Any = None,
    crs: str | CRS | None = None,
    ndv: Any = None,
    max_pixels: int | None = MAX_PIXELS,
) -> SourceHandle:
    """Open a source and decide its bands, mask and CRS.

    ``info`` is the manifest's info (a :class:`~pixels_xr.pxm.manifest.ManifestInfo` or a dict) supplying
    ``bidx``, ``crs`` and ``ndv``; the keyword arguments override it. Raises :class:`SourceError` (``where``
    is the URI) when the file cannot be opened with ``SOURCE_DRIVERS``, declares more than ``max_pixels``
    pixels (None: no limit) or the band indexes do not exist.
    """
    bidx_t = _parse_bidx(bidx if bidx is not None else _info_get(info, "bidx"))
    ndv_t = _parse_triplet(ndv if ndv is not None else _info_get(info, "ndv"))
    crs_in = crs if crs is not None else _info_get(info, "crs")
    ds = _open_dataset(uri)
    try:
        if max_pixels is not None and ds.width * ds.height > max_pixels:
            raise SourceError(f"declares {ds.width} x {ds.height} px = {ds.width * ds.height:,} pixels, more than"
                              f" the limit of {max_pixels:,} (max_pixels / --max-pixels)", where=uri)
        return _handle(uri, ds, bidx_t, ndv_t, crs_in)
    except BaseException:
        ds.close()
        raise


def _handle(
    uri: str,
    ds: rasterio.DatasetReader,
    bidx: tuple[int, ...] | None,
    ndv: tuple[int, int, int] | None,
    crs: str | CRS | None,
) -> SourceHandle:
    count = ds.count
    if bidx is None:
        if count < 3:
            raise SourceError(f"has {count} band(s); RGB needs 3 (or give bidx)", where=uri)
        rgb = (1, 2, 3)
        alpha_candidates = [i for i in range(1, count + 1) if ds.colorinterp[i - 1] == ColorInterp.alpha]
        alpha = next((i for i in alpha_candidates if i not in rgb), None)
    else:
        if len(bidx) not in (3, 4) or any(b < 1 or b > count for b in bidx):
            raise SourceError(f"bidx {list(bidx)} does not fit a dataset with {count} band(s)", where=uri)
        rgb = (bidx[0], bidx[1], bidx[2])
        if len(bidx) == 4:
            alpha = bidx[3]
        else:
            alpha = next(
                (i for i in range(1, count + 1) if ds.colorinterp[i - 1] == ColorInterp.alpha and i not in rgb),
                None,
            )
    flags = tuple(tuple(f) for f in ds.mask_flag_enums)
    if alpha is not None:
        kind: MaskKind = "alpha"
    elif any(MaskFlags.per_dataset in flags[b - 1] and MaskFlags.alpha not in flags[b - 1] for b in rgb):
        kind = "mask"
    elif ndv is not None:
        kind = "ndv"
    else:
        nodatavals = [ds.nodatavals[b - 1] for b in rgb]
        if all(v is not None for v in nodatavals):
            if not all(float(v).is_integer() and 0 <= v <= 255 for v in nodatavals):
                raise SourceError(f"nodata metadata {nodatavals} is not an 8-bit value", where=uri)
            ndv = (int(nodatavals[0]), int(nodatavals[1]), int(nodatavals[2]))
            kind = "nodata"
        else:
            kind = "none"
    if kind not in ("ndv", "nodata"):
        ndv = None
    try:
        crs_out = CRS.from_user_input(crs) if crs is not None else ds.crs
    except Exception as err:  # rasterio.errors.CRSError and friends
        raise SourceError(f"crs {crs!r} does not resolve: {gdal_message(err)}", where=uri) from None
    comp, lossy = _compression(ds)
    return SourceHandle(
        uri=uri,
        dataset=ds,
        bidx=rgb,
        alpha_band=alpha,
        mask_kind=kind,
        ndv=ndv,
        crs=crs_out,
        compression=comp,
        lossy=lossy,
        mask_flags=flags,
    )


def read_source(
    uri: str,
    info: Any = None,
    window: Window | None = None,
    out_shape: tuple[int, int] | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Open, read ``(rgb, valid)`` for a window (default the whole image) and close."""
    with open_source(uri, info, max_pixels=max_pixels) as src:
        return src.read(window=window, out_shape=out_shape)


def nodata_fringe(rgb: np.ndarray, ndv: tuple[int, int, int], tol: int = 8) -> tuple[int, float]:
    """(border size, fraction of it that is *almost* nodata) around the ``ndv`` pixels of ``rgb`` (3, h, w).

    The border is the valid pixels 4-adjacent to a nodata pixel. Where a lossy codec has blurred a nodata
    edge, nearly every border pixel lies within ``tol`` of the ndv in all bands (a fringe that an exact
    ndv mask leaves visible); clean edges score low.
    """
    nd = np.asarray(ndv, dtype=np.int16).reshape(3, 1, 1)
    diff = np.abs(rgb.astype(np.int16) - nd)
    isnd = np.all(diff == 0, axis=0)
    near = np.all(diff <= tol, axis=0) & ~isnd
    adj = np.zeros_like(isnd)
    adj[1:] |= isnd[:-1]
    adj[:-1] |= isnd[1:]
    adj[:, 1:] |= isnd[:, :-1]
    adj[:, :-1] |= isnd[:, 1:]
    border = adj & ~isnd
    n = int(border.sum())
    return n, (float(near[border].mean()) if n else 0.0)
