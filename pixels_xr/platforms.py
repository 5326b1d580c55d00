"""Platform/level registry: collections per provider, band names and aliases, mask rules, reflectance rules.

Data, not code paths: supporting a new collection is adding an entry to ``COLLECTIONS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pixels_xr.errors import ConfigError

ReflectanceRule = Literal["s2_baseline", "landsat_c2", "none"]

#: Sentinel-2 processing baseline 04.00 (from 2022-01-25) adds +1000 to the DN of reflectance bands.
S2_BASELINE_04_START = "2022-01-25"


@dataclass(frozen=True)
class Band:
    """One spectral (or mask) band: its common name, aliases and native resolution in metres."""

    name: str
    aliases: tuple[str, ...]
    resolution: float
    reflectance: bool = True


@dataclass(frozen=True)
class MaskSpec:
    """How to derive a clear-sky mask from one asset.

    A pixel is clear when its value is not in ``not_clear_values`` and none of ``not_clear_bits`` is set;
    with ``clear_values`` given, a pixel is clear only when its value is one of them. ``nodata`` is never clear.
    """

    asset: str
    not_clear_values: tuple[int, ...] = ()
    not_clear_bits: tuple[int, ...] = ()
    nodata: int | None = 0
    clear_values: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Platform:
    """A satellite platform and what its levels offer."""

    name: str
    spellings: tuple[str, ...]
    levels: tuple[str, ...]
    bands: dict[str, tuple[Band, ...]]  # level -> bands
    masks: dict[str, MaskSpec] = field(default_factory=dict)  # level -> default mask
    composite_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # level -> methods
    stac_platform: tuple[str, ...] = ()  # values of the STAC `platform` property that belong to it
    reflectance_rule: ReflectanceRule = "none"
    family: str = ""  # platforms of one family share grids and band names and may mix in one configuration


@dataclass(frozen=True)
class Collection:
    """A STAC collection of one provider serving a platform + level."""

    provider: str
    collection: str
    platform: str
    level: str


# SCL classes (DESIGN.md §3). Default not-clear: nodata, saturated, cloud shadow, cloud medium/high, cirrus.
# Dark area (2), unclassified (7) and snow (11) count as clear: they are real surface observations.
SCL_NOT_CLEAR = (0, 1, 3, 8, 9, 10)
SCL_CLASSES = {
    0: "no data", 1: "saturated or defective", 2: "dark area / topographic shadow", 3: "cloud shadow",
    4: "vegetation", 5: "not vegetated", 6: "water", 7: "unclassified", 8: "cloud medium probability",
    9: "cloud high probability", 10: "thin cirrus", 11: "snow / ice",
}
# Landsat Collection 2 QA_PIXEL: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow.
QA_PIXEL_NOT_CLEAR_BITS = (0, 1, 2, 3, 4)

_S2_L2A = (
    Band("coastal", ("B01", "B1"), 60),
    Band("blue", ("B02", "B2"), 10),
    Band("green", ("B03", "B3"), 10),
    Band("red", ("B04", "B4"), 10),
    Band("rededge1", ("B05", "B5"), 20),
    Band("rededge2", ("B06", "B6"), 20),
    Band("rededge3", ("B07", "B7"), 20),
    Band("nir", ("B08", "B8"), 10),
    Band("nir08", ("B8A",), 20),
    Band("nir09", ("B09", "B9"), 60),
    Band("swir16", ("B11",), 20),
    Band("swir22", ("B12",), 20),
    Band("scl", ("SCL",), 20, reflectance=False),
    Band("aot", ("AOT",), 10, reflectance=False),
    Band("wvp", ("WVP",), 10, reflectance=False),
)
_S2_L1C = tuple(b for b in _S2_L2A if b.name not in {"scl", "aot", "wvp"}) + (Band("cirrus", ("B10",), 60),)

_LANDSAT_OLI = (
    Band("coastal", ("SR_B1", "B1"), 30),
    Band("blue", ("SR_B2", "B2"), 30),
    Band("green", ("SR_B3", "B3"), 30),
    Band("red", ("SR_B4", "B4"), 30),
    Band("nir08", ("SR_B5", "B5", "nir"), 30),
    Band("swir16", ("SR_B6", "B6"), 30),
    Band("swir22", ("SR_B7", "B7"), 30),
    Band("lwir11", ("ST_B10", "B10"), 30, reflectance=False),
    Band("qa_pixel", ("QA_PIXEL",), 30, reflectance=False),
)
_LANDSAT_TM = (
    Band("blue", ("SR_B1", "B1"), 30),
    Band("green", ("SR_B2", "B2"), 30),
    Band("red", ("SR_B3", "B3"), 30),
    Band("nir08", ("SR_B4", "B4", "nir"), 30),
    Band("swir16", ("SR_B5", "B5"), 30),
    Band("swir22", ("SR_B7", "B7"), 30),
    Band("lwir", ("ST_B6", "B6"), 30, reflectance=False),
    Band("qa_pixel", ("QA_PIXEL",), 30, reflectance=False),
)

_SCL_MASK = MaskSpec("scl", not_clear_values=SCL_NOT_CLEAR, nodata=0)
_QA_MASK = MaskSpec("qa_pixel", not_clear_bits=QA_PIXEL_NOT_CLEAR_BITS, nodata=None)


def _landsat(number: int, bands: tuple[Band, ...]) -> Platform:
    return Platform(
        name=f"landsat-{number}",
        spellings=(f"LANDSAT_{number}", f"LANDSAT-{number}", f"landsat{number}", f"L{number}"),
        levels=("L2", "L1"),
        bands={"L2": bands, "L1": tuple(b for b in bands if b.name != "qa_pixel")},
        masks={"L2": _QA_MASK},
        composite_methods={"L2": ("median", "first_clear", "qa_pixel"), "L1": ("median",)},
        stac_platform=(f"landsat-{number}", f"LANDSAT_{number}"),
        reflectance_rule="landsat_c2",
        family="landsat",
    )


PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform(
            name="sentinel-2",
            spellings=("SENTINEL_2", "SENTINEL-2", "S2", "sentinel2"),
            levels=("L2A", "L1C"),
            bands={"L2A": _S2_L2A, "L1C": _S2_L1C},
            masks={"L2A": _SCL_MASK},
            composite_methods={"L2A": ("median", "first_clear", "quality"), "L1C": ("median",)},
            stac_platform=("sentinel-2a", "sentinel-2b", "sentinel-2c", "Sentinel-2A", "Sentinel-2B",
                           "Sentinel-2C"),
            reflectance_rule="s2_baseline",
            family="sentinel-2",
        ),
        _landsat(4, _LANDSAT_TM),
        _landsat(5, _LANDSAT_TM),
        _landsat(7, _LANDSAT_TM),
        _landsat(8, _LANDSAT_OLI),
        _landsat(9, _LANDSAT_OLI),
    )
}

PROVIDERS = {
    "earth-search": "https://earth-search.aws.element84.com/v1",
    "planetary-computer": "https://planetarycomputer.microsoft.com/api/stac/v1",
}

COLLECTIONS: tuple[Collection, ...] = (
    Collection("earth-search", "sentinel-2-l2a", "sentinel-2", "L2A"),
    Collection("earth-search", "sentinel-2-l1c", "sentinel-2", "L1C"),
    Collection("planetary-computer", "sentinel-2-l2a", "sentinel-2", "L2A"),
    *(Collection("earth-search", "landsat-c2-l2", f"landsat-{n}", "L2") for n in (4, 5, 7, 8, 9)),
    *(Collection("planetary-computer", "landsat-c2-l2", f"landsat-{n}", "L2") for n in (4, 5, 7, 8, 9)),
)


def resolve_platform(spelling: str) -> Platform:
    """Platform for any accepted spelling (``SENTINEL_2``, ``sentinel-2``, ``LANDSAT_8`` …)."""
    key = spelling.strip()
    for p in PLATFORMS.values():
        if key.lower() == p.name or key.upper() in {s.upper() for s in p.spellings}:
            return p
    allowed = ", ".join(PLATFORMS)
    raise ConfigError(f"unknown platform {spelling!r}; allowed: {allowed} (or SENTINEL_2, LANDSAT_8 …)",
                      "platforms")


def platform_family(platform: Platform) -> str:
    """The family a platform belongs to (``landsat``, ``sentinel-2``)."""
    return platform.family or platform.name


def platform_of_item(properties: dict, platforms: tuple[Platform, ...]) -> Platform | None:
    """Which configured platform an item's STAC ``platform`` property names (None: none of them)."""
    value = str(properties.get("platform", "")).lower().replace("_", "-")
    for p in platforms:
        if any(value == s.lower().replace("_", "-") for s in p.stac_platform):
            return p
    return None


def canonical_band(platform: Platform, level: str, name: str) -> Band:
    """The band for a name in either naming (``B04`` or ``red``), case-insensitive."""
    wanted = name.strip().lower()
    for band in platform.bands[level]:
        if wanted == band.name or wanted in {a.lower() for a in band.aliases}:
            return band
    names = ", ".join(b.name for b in platform.bands[level])
    raise ConfigError(f"unknown band {name!r} for {platform.name} {level}; allowed: {names} "
                      "(or their aliases such as B04)", "bands")


def asset_candidates(band: Band) -> tuple[str, ...]:
    """Asset keys that may hold a band, in order of preference (common name first, then aliases)."""
    keys = [band.name, *band.aliases]
    return tuple(dict.fromkeys(keys + [k.lower() for k in keys] + [k.upper() for k in keys]))


def collection_for(provider: str, platform: Platform, level: str) -> str:
    """Collection id serving platform + level at a provider."""
    for c in COLLECTIONS:
        if c.provider == provider and c.platform == platform.name and c.level == level:
            return c.collection
    raise ConfigError(f"no known collection for {platform.name} {level} at {provider}; "
                      "set `collection` to the collection id", "collection")


def default_mask(platform: Platform, level: str) -> MaskSpec | None:
    """The platform's default clear-sky mask at a level (None when the level has no mask band)."""
    return platform.masks.get(level)


def reflectance_scale_offset(platform: Platform, properties: dict) -> tuple[float, float]:
    """Fallback scale/offset (reflectance = DN × scale + offset) when an item carries none in its metadata.

    Sentinel-2: from ``s2:processing_baseline`` (≥ 04.00 adds +1000 to DN) or, lacking it, the acquisition
    date against 2022-01-25. Landsat Collection 2 L2: 2.75e-5, −0.2.
    """
    if platform.reflectance_rule == "landsat_c2":
        return 2.75e-5, -0.2
    if platform.reflectance_rule == "s2_baseline":
        baseline = properties.get("s2:processing_baseline") or properties.get("sentinel:processing_baseline")
        if baseline is not None:
            try:
                major = float(str(baseline))
            except ValueError:
                major = 0.0
            return 1e-4, (-0.1 if major >= 4.0 else 0.0)
        when = str(properties.get("datetime") or properties.get("start_datetime") or "")[:10]
        return 1e-4, (-0.1 if when >= S2_BASELINE_04_START else 0.0)
    return 1.0, 0.0
