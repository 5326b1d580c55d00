"""The project's one exception family: every error a user can cause names the field, path or file at fault."""

from __future__ import annotations


class PixelsError(Exception):
    """Base of every error pixels_xr raises on purpose.

    ``where`` is the field path, JSON path, file or URL at fault; ``str(err)`` is one line
    ``"<where>: <message>"`` suitable for a CLI.
    """

    #: Longest ``where`` and message kept: a user's 10 MB string is never echoed whole.
    MAX_WHERE = 300
    MAX_MESSAGE = 2000

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = _cut(" ".join(str(message).split()), self.MAX_MESSAGE)
        self.where = None if where is None else _cut(" ".join(str(where).split()), self.MAX_WHERE)
        super().__init__(f"{self.where}: {self.message}" if self.where else self.message)

    def __reduce__(self) -> tuple:
        # pickled by its own arguments (errors travel from Dask workers to the client), never by a cause
        return self.__class__, (self.message, self.where)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
