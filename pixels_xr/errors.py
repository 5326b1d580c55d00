"""The project's one exception family: every error a user can cause names the field, path or file at fault."""

from __future__ import annotations


class PixelsError(Exception):
    """Base of every error pixels_xr raises on purpose.

    ``where`` is the field path, JSON path, file or URL at fault; ``str(err)`` is one line
    ``"<where>: <message>"`` suitable for a CLI.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = " ".join(str(message).split())
        self.where = where
        super().__init__(f"{where}: {self.message}" if where else self.message)


class ConfigError(PixelsError):
    """The pixels configuration or the features given with it are invalid."""


class CatalogError(PixelsError):
    """A catalog (STAC API or local file) could not be searched or read."""


class AssetReadError(PixelsError):
    """A source asset could not be read (missing, truncated, unreachable)."""


class OutputError(PixelsError):
    """An output could not be written or an existing output is inconsistent."""


class ManifestError(PixelsError):
    """A PXM manifest is invalid; ``where`` is the JSON path (e.g. ``info.tilesets[0]``)."""


class SourceError(PixelsError):
    """A PXM source image fails a check; ``where`` is the source URI."""


class ModelError(PixelsError):
    """A model or its sidecar for inference is invalid."""
