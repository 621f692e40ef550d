"""Catalogue images: a built catalogue written once per snapshot version, mapped at start.

Building the catalogue from the Redis snapshot takes tens of seconds at a million accounts
and rates (every row decoded into Python objects); an engine restarted on the same host
would do it again while FreeSWITCH's calls go to the other engines. After a full load the
engine writes the catalogue as it was built to ``<directory>/<prefix hash>-<version>-<token>.img``;
a process that needs that version later (a restart, another process of the host) maps the
file instead: the large tables are ``engine.rules.packed`` buffers, pickled out of band
(protocol 5) and handed back as views of the read-only mapping, so nothing is copied or
decoded, and the pages are shared by every process that maps the file. Only the small
parts (rate groups, trunks, IP map, the change-tracking rows) are unpickled.

An image holds the snapshot at one change count (the ``changes`` of its stamp); the
watcher applies the changes made since from the sync journal, as after any gap.

File layout: ``MAGIC``, the header length (8 bytes, little endian), the header (JSON:
format, code fingerprint, prefix, version, token, changes, the pickle's and each buffer's
offset and length, the CRC-32 of everything after the header), then the pickle and the
buffers, each at an offset aligned to 8 bytes.

Failure modes, each decided: no directory configured -> no images; no file for the current
version and token -> full load; a file that does not check out (another format or code
fingerprint, a stamp other than its name, a size or CRC mismatch: truncated or corrupt) ->
removed, full load; a failure to write (disk full, permissions) -> logged, the temporary file
removed, the engine serves its catalogue as built. A file is written under a temporary name
and renamed, so a reader never sees half of one; concurrent writers of one version each
rename a complete file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import mmap
import os
import pickle
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from engine.state.snapshot import SnapshotStamp

__all__ = ["FORMAT", "EncodedImage", "ImageError", "ImageStore", "LoadedImage", "code_fingerprint"]

log = logging.getLogger(__name__)

MAGIC = b"CGCATIMG"
FORMAT = 1
_ALIGN = 8
_READ_CHUNK = 1 << 22


def code_fingerprint(modules: Iterable[ModuleType]) -> str:
    """A digest of the interpreter version and the source of ``modules``.

    An image is a pickle of the catalogue's objects: code that changed any of them (a new
    slot, another index) must not read an image written by the old code, so the fingerprint
    is part of the image and must match.
    """
    digest = hashlib.sha256(sys.version.encode())
    for module in modules:
        paths = [Path(module.__file__ or "")]
        if paths[0].name == "__init__.py":  # a package: all of its modules
            paths = sorted(paths[0].parent.rglob("*.py"))
        for path in paths:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


class LoadedImage(NamedTuple):
    stamp: SnapshotStamp
    value: Any
    path: Path


class ImageError(Exception):
    """An image file that does not check out (it is removed and not used)."""


# What reading a bad file may raise (a valid CRC makes most of them very unlikely).
_UNUSABLE = (
    ImageError,
    OSError,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
)


class ImageStore:
    """Images of one deployment (key prefix) in one directory."""

    def __init__(self, directory: str | os.PathLike[str] | None, prefix: str, fingerprint: str) -> None:
        """``directory`` None: no files (images are only encoded and read from memory)."""
        self.directory = None if directory is None else Path(directory)
        self.prefix = prefix
        self.fingerprint = fingerprint
        self._family = hashlib.sha256(prefix.encode()).hexdigest()[:16]

    def path_of(self, version: int, token: str | None) -> Path:
        return Path(self.directory or ".") / f"{self._family}-{version}-{token or 'none'}.img"

    # --- writing ---------------------------------------------------------------------------------

    def encode(self, stamp: SnapshotStamp, value: Any) -> EncodedImage:
        """The image of ``value`` built at ``stamp``, ready to be written out (file or Redis blob).

        The large buffers are not copied: the result refers to ``value``'s memory, so encode
        before ``value`` is shared with code that changes it.
        """
        buffers: list[pickle.PickleBuffer] = []
        payload = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        pieces: list[Any] = [payload, *(b.raw() for b in buffers)]
        parts: list[tuple[int, int]] = []
        offset = 0
        for piece in pieces:
            offset = _aligned(offset)
            parts.append((offset, len(piece)))
            offset += len(piece)
        crc = 0
        for chunk in _body(parts, pieces):
            crc = zlib.crc32(chunk, crc)
        header = json.dumps(
            {
                "format": FORMAT,
                "code": self.fingerprint,
                "prefix": self.prefix,
                "version": stamp.version,
                "token": stamp.token,
                "changes": stamp.changes,
                "parts": parts,
                "size": offset,
                "crc32": crc,
            }
        ).encode()
        head = MAGIC + len(header).to_bytes(8, "little") + header
        head += bytes(_aligned(len(head)) - len(head))
        return EncodedImage(stamp, head, parts, pieces)

    def write(self, stamp: SnapshotStamp, value: Any) -> Path | None:
        """Write the image of ``value`` built at ``stamp``; remove this prefix's older images.

        Never raises for I/O (disk full, no permission, ...): logs and returns None. Call it
        before ``value`` is shared with code that changes it (right after the build).
        """
        if self.directory is None:
            return None
        try:
            encoded = self.encode(stamp, value)
        except (pickle.PicklingError, TypeError, ValueError):
            log.warning("catalogue image of version %d not encoded", stamp.version, exc_info=True)
            return None
        return self.write_chunks(stamp, encoded.chunks())

    def write_chunks(self, stamp: SnapshotStamp, chunks: Iterable[Any]) -> Path | None:
        """Write an image given as its bytes in order (``EncodedImage.chunks``, a fetched blob).

        Not checked here: :meth:`load` checks it like any other file. Never raises for I/O.
        """
        if self.directory is None:
            return None
        path = self.path_of(stamp.version, stamp.token)
        temporary: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
            os.replace(temporary, path)
            temporary = None
        except (OSError, pickle.PicklingError, TypeError, ValueError):
            log.warning("catalogue image %s not written; engines will load from Redis", path, exc_info=True)
            return None
        finally:
            if temporary is not None:
                _remove(Path(temporary))
        self._remove_others(path)
        return path

    def _remove_others(self, keep: Path) -> None:
        """Older versions of this prefix (a process that mapped one keeps its pages until it lets go)."""
        if self.directory is None:
            return
        try:
            for other in self.directory.glob(f"{self._family}-*.img"):
                if other != keep:
                    _remove(other)
        except OSError:
            log.debug("listing %s failed", self.directory, exc_info=True)

    @contextlib.contextmanager
    def host_lock(self, timeout: float = 120.0, poll: float = 0.05) -> Iterator[bool]:
        """Hold this prefix's lock file in the directory (``flock``): one process of the host
        fetches an image while the others wait for its file. Yields True if it had to wait
        (another process held it: look for the image again), False at once otherwise.

        Polls with ``time.sleep`` (cooperative once gevent patched it), never blocks in the
        kernel. Past ``timeout``, or when the lock file cannot be opened, yields without it
        (each process then fetches on its own, as without the lock). The kernel releases the
        lock of a process that dies.
        """
        handle = None
        waited = False
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                handle = open(self.directory / f".{self._family}.lock", "a+b")  # noqa: SIM115
            except OSError:
                log.debug("no lock file in %s", self.directory, exc_info=True)
        try:
            deadline = time.monotonic() + timeout
            while handle is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = True
                    if time.monotonic() > deadline:
                        log.warning(
                            "waited %.0fs for the image lock of %s: going on without it",
                            timeout,
                            self.directory,
                        )
                        handle.close()
                        handle = None
                        break
                    time.sleep(poll)
            yield waited
        finally:
            if handle is not None:
                handle.close()  # releases the lock

    # --- reading ---------------------------------------------------------------------------------

    def load(self, current: SnapshotStamp) -> LoadedImage | None:
        """The image of ``current``'s version and token, if one checks out, with at most its changes.

        None when there is none (or it is unusable: it is then removed). Never raises for a
        bad file; the caller loads from Redis.
        """
        if self.directory is None:
            return None
        path = self.path_of(current.version, current.token)
        if not path.exists():
            return None
        try:
            loaded = self._load(path)
        except _UNUSABLE as exc:
            log.warning("catalogue image %s unusable (%s): removed, loading from Redis", path, exc)
            _remove(path)
            return None
        if not _fits(loaded.stamp, current):
            log.warning("catalogue image %s holds another version: removed", path)
            _remove(path)
            return None
        if loaded.stamp.changes > current.changes:
            return None  # newer than Redis says (Redis restored from an older copy?): not trusted
        return loaded

    def load_buffer(self, buffer: bytearray | bytes, current: SnapshotStamp, origin: str) -> LoadedImage:
        """The image held in memory (a fetched blob), checked as a file is; raises ImageError.

        The large tables stay views of ``buffer`` (not copied). ``origin`` names it in logs.
        """
        view = memoryview(buffer)
        try:
            if bytes(view[: len(MAGIC)]) != MAGIC:
                raise ImageError("not a catalogue image")
            length = int.from_bytes(view[len(MAGIC) : len(MAGIC) + 8], "little")
            header, body = self._header(length, bytes(view[len(MAGIC) + 8 : len(MAGIC) + 8 + length]))
            if len(view) != body + int(header["size"]):
                raise ImageError("truncated or extended")
            if zlib.crc32(view[body:]) != header["crc32"]:
                raise ImageError("CRC mismatch")
            loaded = _unpickled(view, header, body, Path(origin))
        except ImageError:
            raise
        except _UNUSABLE as exc:
            raise ImageError(f"unreadable: {exc!r}") from exc
        if not _fits(loaded.stamp, current) or loaded.stamp.changes > current.changes:
            raise ImageError(f"holds {tuple(loaded.stamp)}, not {current.version} at most its changes")
        return loaded

    def _header(self, length: int, raw: bytes) -> tuple[dict[str, Any], int]:
        """The checked header and the body's offset."""
        if not 0 < length < 1 << 20 or len(raw) != length:
            raise ImageError("bad header length")
        header = json.loads(raw)
        if header.get("format") != FORMAT or header.get("code") != self.fingerprint:
            raise ImageError("written by other code (format or fingerprint differ)")
        if header.get("prefix") != self.prefix:
            raise ImageError("written for another prefix")
        return header, _aligned(len(MAGIC) + 8 + length)

    def _load(self, path: Path) -> LoadedImage:
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                raise ImageError("not a catalogue image")
            length = int.from_bytes(handle.read(8), "little")
            header, body = self._header(length, handle.read(length) if 0 < length < 1 << 20 else b"")
            size = int(header["size"])
            if os.fstat(handle.fileno()).st_size != body + size:
                raise ImageError("truncated or extended")
            # The CRC is read through the file, not the mapping: the check does not make every
            # page part of this process's resident memory (they are touched on demand).
            handle.seek(body)
            crc = 0
            while chunk := handle.read(_READ_CHUNK):
                crc = zlib.crc32(chunk, crc)
            if crc != header["crc32"]:
                raise ImageError("CRC mismatch")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return _unpickled(memoryview(mapped), header, body, path)


class EncodedImage(NamedTuple):
    """An image as :meth:`ImageStore.encode` made it: ``head`` then the body's pieces."""

    stamp: SnapshotStamp
    head: bytes
    parts: list[tuple[int, int]]
    pieces: list[Any]

    @property
    def size(self) -> int:
        """The whole image's length in bytes."""
        start, length = self.parts[-1]
        return len(self.head) + start + length

    def chunks(self, size: int = 0) -> Iterator[Any]:
        """The image's bytes in order; with ``size``, in bytes objects of exactly ``size``
        bytes (the last one shorter)."""
        pieces = itertools.chain([self.head], _body(self.parts, self.pieces))
        if size <= 0:
            yield from pieces
            return
        pending = bytearray()
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while len(view):
                take = min(size - len(pending), len(view))
                pending += view[:take]
                view = view[take:]
                if len(pending) == size:
                    yield bytes(pending)
                    pending.clear()
        if pending:
            yield bytes(pending)


def _fits(loaded: SnapshotStamp, current: SnapshotStamp) -> bool:
    return loaded.version == current.version and loaded.token == current.token


def _unpickled(view: memoryview, header: dict[str, Any], body: int, path: Path) -> LoadedImage:
    parts = [view[body + start : body + start + length] for start, length in header["parts"]]
    value = pickle.loads(parts[0], buffers=parts[1:])
    stamp = SnapshotStamp(int(header["version"]), header["token"], int(header["changes"]))
    return LoadedImage(stamp, value, path)


def _body(parts: list[tuple[int, int]], pieces: list[Any]) -> Iterable[Any]:
    """The file's body: each piece at its offset, zeros between."""
    position = 0
    for (start, length), piece in zip(parts, pieces, strict=True):
        if start > position:
            yield bytes(start - position)
        yield piece
        position = start + length


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        log.debug("could not remove %s", path, exc_info=True)
