"""Catalogue images published through Redis: a new host starts from a blob, not from rows.

A catalogue image (``engine.state.image``) spares a restarted engine the full load (decoding
every row and building: ~2 minutes at 1M accounts + 1M rates) only on a host that already
built that version. The *first* start of a version on a host (a new host, a new version)
would decode every row. So one producer per snapshot version (``callgate sync`` after each
full snapshot it publishes, or ``callgate image publish``) builds the image once, exactly as
an engine does, and stores it in Redis; an engine that has no usable local image fetches it,
verifies it (the image's own format, code fingerprint, prefix, size and CRC checks), writes
it into its image directory when one is configured (so the host's other processes map it)
or else reads it from memory, then catches up from the sync journal as from a local image.

Layout: one hash per snapshot version, ``P snapshot:{v}:image`` (``engine.state.keys``),
deleted with the version's other keys. Per code fingerprint ``fp`` (an engine of other code
ignores the images of other code) it holds:

- field ``fp``: the manifest, JSON ``{token, changes, size, chunks, chunk_bytes, nonce}``,
  written last: a blob is complete once its manifest names it;
- fields ``fp:{nonce}:{n}``: chunk ``n`` (``chunk_bytes`` each, the last one shorter).

Chunks bound the time one command holds Redis' single thread (one GET of a 300 MB image would
stall every engine's limits script for a fraction of a second; a 1 MiB chunk costs Redis less
than 0.1 ms). Every write is a Lua script that first checks that version ``v`` still exists
with the producer's token, so a version deleted while its image was written does not get
its hash back (nothing is left behind without an owner). A new blob of the same version and
code (a producer run again) takes a new nonce, switches the manifest, then deletes the old
chunks: a reader always reads one blob's chunks or finds one missing (the chunks of a producer
stopped mid-way are named by no manifest; they go with the version). After publishing, the
producer deletes the images of the versions before ``v``: only the current version's blob
is kept.

Failure modes, each decided (the engine side is ``SnapshotHolder._load_image``):

- no blob for this version and code (none yet, or only another code's): the engine loads the
  rows, as without blobs;
- a chunk missing (evicted, or deleted while read: a newer version, a new blob) or of the
  wrong size: :class:`BlobUnusable`, the engine loads the rows;
- a blob that does not check out (truncated, corrupt, a CRC mismatch): ``ImageError``, the
  engine loads the rows; the blob stays (the next producer run replaces it);
- Redis failing mid-fetch: the redis error propagates as any failed load does (the watcher
  keeps what it holds and retries with backoff);
- a newer version published while fetching: the fetched version is served (complete and
  consistent), then the watcher loads the new one, as after any load that raced a switch.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import redis

from engine.model import ENTITY_TYPES, CatalogData
from engine.state.image import EncodedImage, ImageStore
from engine.state.keys import image_blob_key, meta_key, versions_key
from engine.state.snapshot import SnapshotStamp, fetch_snapshot, gc_paused

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BlobManifest",
    "BlobUnusable",
    "PublishResult",
    "blob_chunks",
    "build_image",
    "publish_blob",
    "publish_current",
    "read_manifest",
]

log = logging.getLogger(__name__)

# 1 MiB less one page. Redis' own time per HGET, measured (docs/performance.md): ~0.08 ms at 1 MiB,
# ~0.4 ms at 4 MiB, ~8.5 ms at 8 MiB, ~90 ms at 64 MiB; the whole fetch was fastest at 1 MiB too.
# Less a page because a value of exactly 1 MiB plus Redis' string header takes jemalloc's 1.25 MiB
# size class (25 % more memory, measured with MEMORY USAGE); this one fits the 1 MiB class.
DEFAULT_CHUNK_BYTES = (1 << 20) - 4096

# KEYS[1] meta of the version, KEYS[2] its image hash; ARGV: token, then field, value pairs.
# Writes only while the version exists with that token (never re-creates a deleted version's hash).
_WRITE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


class BlobUnusable(Exception):
    """A published image that cannot be read whole (a chunk missing or of the wrong size)."""


class BlobManifest(NamedTuple):
    fingerprint: str
    token: str | None
    changes: int
    size: int
    chunks: int
    chunk_bytes: int
    nonce: str

    @property
    def stamp(self) -> SnapshotStamp:
        return SnapshotStamp(-1, self.token, self.changes)

    def chunk_field(self, index: int) -> str:
        return f"{self.fingerprint}:{self.nonce}:{index}"


class PublishResult(NamedTuple):
    stamp: SnapshotStamp
    published: bool  # False: this version's blob for this code was already there
    size: int
    chunks: int
    build_seconds: float
    upload_seconds: float


# --- the producer ---------------------------------------------------------------------------------


def build_image(
    client: redis.Redis, prefix: str, build: Callable[[CatalogData], Any], images: ImageStore
) -> EncodedImage:
    """Read the current version from Redis and build its catalogue exactly as an engine does
    (``SnapshotHolder``: decode, ``build``, ``track_changes``), then encode its image."""
    raw = fetch_snapshot(client, prefix)
    schemas = {name: _fields(raw.meta.get(f"schema:{name}")) for name in ENTITY_TYPES}
    with gc_paused():
        data = raw.decode()
        raw.values.clear()
        value = build(data)
        track = getattr(value, "track_changes", None)
        if track is None or not callable(getattr(value, "apply_changes", None)):
            raise TypeError("the catalogue does not follow changes in place: no image")
        track(data)
        del data
        return images.encode(raw.stamp, (value, schemas))


def publish_blob(
    client: redis.Redis,
    prefix: str,
    image: EncodedImage,
    fingerprint: str,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> bool:
    """Store ``image`` as its version's blob for ``fingerprint``; False if that version is gone.

    One HSET per chunk, the manifest last; then this code's previous blob of the version and
    every older version's images are deleted. Redis errors propagate (nothing is left that a
    reader would take for complete: the manifest is written last).
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    stamp = image.stamp
    meta, key = meta_key(prefix, stamp.version), image_blob_key(prefix, stamp.version)
    token = stamp.token or ""
    write = client.register_script(_WRITE)
    previous = read_manifest(client, prefix, stamp.version, fingerprint)
    nonce = secrets.token_hex(4)
    count = 0
    for index, chunk in enumerate(image.chunks(chunk_bytes)):
        if not write(keys=[meta, key], args=[token, f"{fingerprint}:{nonce}:{index}", chunk]):
            return False
        count += 1
    manifest = {
        "token": stamp.token,
        "changes": stamp.changes,
        "size": image.size,
        "chunks": count,
        "chunk_bytes": chunk_bytes,
        "nonce": nonce,
    }
    if not write(keys=[meta, key], args=[token, fingerprint, json.dumps(manifest)]):
        return False
    if previous is not None and previous.nonce != nonce:
        client.hdel(key, *(previous.chunk_field(n) for n in range(previous.chunks)))
    older = [int(v) for v in cast(list[bytes], client.zrange(versions_key(prefix), 0, -1))]
    doomed = [image_blob_key(prefix, v) for v in older if v < stamp.version]
    if doomed:
        client.unlink(*doomed)
    return True


def publish_current(
    client: redis.Redis,
    prefix: str,
    build: Callable[[CatalogData], Any],
    images: ImageStore,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    force: bool = False,
    version: int | None = None,
) -> PublishResult | None:
    """Build the current version's image and publish it (the producer's whole job).

    Skipped (``published=False``) when the current version already has a blob of this code
    (``force`` builds it again), None when the snapshot moved on from ``version`` (when
    given) before or during the build: the newer version's producer does it.
    """
    from engine.state.snapshot import current_stamp

    stamp = current_stamp(client, prefix)
    if stamp is None or (version is not None and stamp.version != version):
        return None
    existing = read_manifest(client, prefix, stamp.version, images.fingerprint)
    if existing is not None and existing.token == stamp.token and not force:
        return PublishResult(stamp, False, existing.size, existing.chunks, 0.0, 0.0)
    started = time.monotonic()
    image = build_image(client, prefix, build, images)
    built = time.monotonic()
    if version is not None and image.stamp.version != version:
        return None
    if not publish_blob(client, prefix, image, images.fingerprint, chunk_bytes=chunk_bytes):
        return None
    done = time.monotonic()
    chunks = -(-image.size // chunk_bytes)
    log.info(
        "catalogue image of version %d (changes %d) published: %.1f MB in %d chunks, build %.1fs, "
        "upload %.1fs",
        image.stamp.version,
        image.stamp.changes,
        image.size / 1e6,
        chunks,
        built - started,
        done - built,
    )
    return PublishResult(image.stamp, True, image.size, chunks, built - started, done - built)


# --- the reader -------------------------------------------------------------------------------------


def read_manifest(client: redis.Redis, prefix: str, version: int, fingerprint: str) -> BlobManifest | None:
    """The manifest of ``version``'s blob for ``fingerprint``, or None (none, or unreadable)."""
    raw = client.hget(image_blob_key(prefix, version), fingerprint)
    if raw is None:
        return None
    try:
        found = json.loads(raw)
        return BlobManifest(
            fingerprint,
            found["token"],
            int(found["changes"]),
            int(found["size"]),
            int(found["chunks"]),
            int(found["chunk_bytes"]),
            str(found["nonce"]),
        )
    except (TypeError, ValueError, KeyError):
        log.warning("catalogue image manifest of version %d unreadable: ignored", version)
        return None


def blob_chunks(client: redis.Redis, prefix: str, version: int, manifest: BlobManifest) -> Iterator[bytes]:
    """The blob's chunks in order, one HGET (one round trip) each; raises BlobUnusable when one
    is missing or not of its size. Redis errors propagate."""
    key = image_blob_key(prefix, version)
    for index in range(manifest.chunks):
        chunk = client.hget(key, manifest.chunk_field(index))
        expected = min(manifest.chunk_bytes, manifest.size - index * manifest.chunk_bytes)
        if chunk is None:
            raise BlobUnusable(f"chunk {index} of {manifest.chunks} is missing (deleted or evicted)")
        if len(chunk) != expected:
            raise BlobUnusable(f"chunk {index} holds {len(chunk)} bytes, not {expected}")
        yield cast(bytes, chunk)


def _fields(stored: str | None) -> tuple[str, ...] | None:
    return tuple(stored.split(",")) if stored else None
