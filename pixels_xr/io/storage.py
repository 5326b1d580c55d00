"""Output locations: local paths or fsspec URLs (``s3://``, ``gs://``, …) behind a few atomic operations.

Atomicity: a local file is written next to its destination under a hidden temporary name and renamed into
place (``os.replace``); an object store PUT is atomic per object, and the upload starts only once the local
temporary file is complete. Readers therefore never see half-written files.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec

from pixels_xr.errors import OutputError


def is_remote(url: str) -> bool:
    """True for fsspec URLs other than local files (``s3://b/k``); False for paths and ``file://``."""
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """A local path for a local URL (``file://`` stripped)."""
    return url[len("file://"):] if url.startswith("file://") else url


def check_url(url: str) -> str:
    """``url`` if it names one place plainly: an object-store URL with a ``.`` or ``..`` segment (which the
    store would keep as a literal key) is refused."""
    if is_remote(url):
        segments = url.split("://", 1)[1].split("/")
        if any(seg in {".", ".."} for seg in segments):
            raise OutputError("an object-store URL must not contain '.' or '..' segments", url)
    return url


def join(url: str, *parts: str) -> str:
    """``url`` joined with ``parts`` using ``/`` (object stores) or the OS separator (local paths).

    A part that would climb out of ``url`` (``..``, an absolute path, a backslash) is refused: parts are
    names made from user input (feature ids, labels), and this is where they become paths."""
    for part in parts:
        pieces = part.replace("\\", "/").split("/")
        if part.startswith(("/", "\\")) or ".." in pieces or (os.sep != "/" and os.sep in part):
            raise OutputError(f"{part!r} is not a plain name inside the output", url)
    if is_remote(url):
        return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(local_path(url)).joinpath(*parts))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (temp + rename locally, one PUT remotely)."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            fs.pipe_file(path, data)
            return
        target = Path(local_path(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:  # a full disk must not leave an empty or partial temporary file behind
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write: {exc}", url) from None


def write_files(url: str, files: dict[str, bytes]) -> None:
    """Some files of an existing folder (relative names → bytes) replaced, each atomically (``write_bytes``:
    a reader finds each file old or new, never partial), the folder's other files kept; remotely one
    concurrent PUT of them all."""
    if not files:
        return
    if is_remote(url):
        try:
            fs, path = filesystem(url)
            fs.pipe({f"{path.rstrip('/')}/{name}": data for name, data in files.items()})
        except OSError as exc:
            raise OutputError(f"cannot write: {exc}", url) from None
        return
    for name, data in files.items():
        write_bytes(join(url, name), data)


def write_tree(url: str, files: dict[str, bytes]) -> None:
    """The files of a folder (relative names → bytes) in place of whatever ``url`` held. Locally they are
    written into a hidden sibling folder, which is then renamed into place, so a reader finds the old tree
    or the new one, each whole; on an object store the old objects are removed and the new ones PUT
    concurrently (one fsspec ``pipe``)."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.pipe({f"{path.rstrip('/')}/{name}": data for name, data in files.items()})
            return
        import shutil

        target = Path(local_path(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            # each folder made once, not once per file, in the order the files come (a small folder lists
            # its entries in the order they were made: Zarr groups list their arrays so)
            for folder in dict.fromkeys(os.path.dirname(name) for name in files):
                os.makedirs(os.path.join(stage, folder), exist_ok=True)
            for name, data in files.items():
                with open(os.path.join(stage, name), "wb") as fh:
                    fh.write(data)
            if target.exists():
                os.replace(target, old)
            os.replace(stage, target)
        finally:  # a full disk must not leave a partial folder behind
            shutil.rmtree(stage, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc}", url) from None


def read_tree(url: str) -> dict[str, bytes]:
    """Every file under the folder ``url`` (relative names with ``/`` → bytes; empty when there is none):
    the inverse of ``write_tree``. Remotely one listing and one concurrent fetch."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            root = path.rstrip("/") + "/"
            names = [n for n in fs.find(root) if n.startswith(root)]
            return {name[len(root):]: data for name, data in fs.cat(names, on_error="raise").items()} \
                if names else {}
        base = local_path(url)
        out = {}
        for folder, _, names in os.walk(base):
            for name in names:
                full = os.path.join(folder, name)
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, base).replace(os.sep, "/")] = fh.read()
        return out
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise OutputError(f"cannot read: {exc}", url) from None


def read_bytes(url: str) -> bytes | None:
    """The bytes at ``url``, or None when nothing is there."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            return fs.cat_file(path)
        return Path(local_path(url)).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read: {exc}", url) from None


def exists(url: str) -> bool:
    """True when something is stored at ``url``."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.invalidate_cache(path)
        return bool(fs.exists(path))
    return os.path.exists(local_path(url))


def list_names(url: str) -> list[str]:
    """Names (not paths) of the entries directly under ``url``; empty when it does not exist."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            fs.invalidate_cache(path)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        return sorted(os.listdir(local_path(url)))
    except FileNotFoundError:
        return []


def remove_tree(url: str) -> None:
    """Delete ``url`` and everything under it (missing is fine)."""
    if is_remote(url):
        fs, path = filesystem(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    import shutil

    p = Path(local_path(url))
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


@contextlib.contextmanager
def staged_file(url: str, suffix: str = "") -> Iterator[str]:
    """A local temporary path to write; on clean exit it becomes ``url`` atomically, on error it is removed."""
    if is_remote(url):
        directory = None
    else:
        directory = Path(local_path(url)).parent
        directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pixels-xr-", suffix=suffix, dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; published files get the usual permissions
    try:
        yield tmp
        if is_remote(url):
            fs, path = filesystem(url)
            fs.put_file(tmp, path)
        else:
            os.replace(tmp, local_path(url))
    except OSError as exc:
        raise OutputError(f"cannot write: {exc}", url) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
