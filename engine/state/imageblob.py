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
- fields ``fp:{nonce}:{n}``: chunk ``n`` (``chunk_bytes`` each, the last one shorter);
- field ``building:{fp}`` while a producer builds it: JSON ``{until_ms, started_ms, by}``, alive
  while Redis' clock is before ``until_ms`` (:func:`mark_building`, renewed while it builds,
  removed when done); an engine switching to the version waits for the image rather than
  build the catalogue itself too (``SnapshotHolder._await_image``, docs/sync.md "Waiting for
  the image of a new version").

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

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple, cast

import redis

from engine.model import ENTITY_TYPES, CatalogData
from engine.state.image import EncodedImage, ImageStore
from engine.state.keys import image_blob_key, meta_key, pointer_key, versions_key
from engine.state.snapshot import SnapshotStamp, fetch_snapshot, gc_paused

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BlobManifest",
    "BlobUnusable",
    "BuildMarker",
    "ImagePoll",
    "PublishResult",
    "blob_chunks",
    "build_image",
    "building_field",
    "clear_building",
    "mark_building",
    "poll_image",
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


# KEYS[1] meta of the version, KEYS[2] its image hash; ARGV: token, marker field, ttl_ms, by.
# Sets (or renews) the "being built" marker while the version exists with that token: valid until
# Redis' own clock reaches until_ms (one clock for every reader: no skew between hosts).
_MARK = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local started = now_ms
local old = redis.call('HGET', KEYS[2], ARGV[2])
if old then
  local ok, found = pcall(cjson.decode, old)
  if ok and type(found) == 'table' and tonumber(found['started_ms']) then
    started = tonumber(found['started_ms'])
  end
end
local marker = {until_ms = now_ms + tonumber(ARGV[3]), started_ms = started, by = ARGV[4]}
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(marker))
return 1
"""

# How long a "being built" marker stays valid without being renewed, and how often its producer
# renews it. Generous against the producer's own pauses (a long C call holding its GIL, a
# stalled Redis): a producer killed (kill -9) is taken for dead by the engines within this.
MARKER_TTL_SECONDS = 30.0
MARKER_RENEW_SECONDS = 5.0


def building_field(fingerprint: str) -> str:
    """The image hash's field marking that ``fingerprint``'s image of the version is being built."""
    return f"building:{fingerprint}"


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


class BuildMarker(NamedTuple):
    """A producer's "being built" marker, as read with Redis' clock (``now_ms``)."""

    until_ms: int
    started_ms: int
    by: str

    def alive(self, now_ms: int) -> bool:
        return now_ms < self.until_ms


class ImagePoll(NamedTuple):
    """One look at a version's image (one round trip): what an engine that waits for it needs."""

    manifest: BlobManifest | None
    marker: BuildMarker | None  # None: no marker (or unreadable)
    current: int | None  # the version the pointer names now
    published_ms: int | None  # when the version became current (its meta's published_at_ms)
    now_ms: int  # Redis' clock
    previous_imaged: bool = False  # the ``previous`` version asked about has an image of this code

    @property
    def building(self) -> bool:
        """A live producer builds this code's image of the version."""
        return self.marker is not None and self.marker.alive(self.now_ms)


class PublishResult(NamedTuple):
    stamp: SnapshotStamp
    published: bool  # False: this version's blob for this code was already there
    size: int
    chunks: int
    build_seconds: float
    upload_seconds: float


# --- the producer ---------------------------------------------------------------------------------


def build_image(
    client: redis.Redis,
    prefix: str,
    build: Callable[[CatalogData], Any],
    images: ImageStore,
    records: Collection[str] = (),
) -> EncodedImage:
    """Read the current version from Redis and build its catalogue exactly as an engine does
    (``SnapshotHolder``: decode, with ``records`` as packed record rows, ``build``,
    ``track_changes``), then encode its image."""
    raw = fetch_snapshot(client, prefix)
    schemas = {name: _fields(raw.meta.get(f"schema:{name}")) for name in ENTITY_TYPES}
    with gc_paused():
        data = raw.decode(records)
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
    by: str = "",
    marker_ttl: float = MARKER_TTL_SECONDS,
    records: Collection[str] = (),
) -> PublishResult | None:
    """Build the current version's image and publish it (the producer's whole job).

    Skipped (``published=False``) when the current version already has a blob of this code
    (``force`` builds it again), None when the snapshot moved on from ``version`` (when
    given) before or during the build: the newer version's producer does it. While it builds,
    the version's image is marked as being built (:func:`mark_building`, renewed from a thread,
    removed at the end whatever the outcome; ``by`` names the producer in it).
    """
    from engine.state.snapshot import current_stamp

    stamp = current_stamp(client, prefix)
    if stamp is None or (version is not None and stamp.version != version):
        return None
    fingerprint = images.fingerprint
    try:
        existing = read_manifest(client, prefix, stamp.version, fingerprint)
        if existing is not None and existing.token == stamp.token and not force:
            return PublishResult(stamp, False, existing.size, existing.chunks, 0.0, 0.0)
        # Engines switching to this version wait for its image rather than build it themselves.
        mark_building(client, prefix, stamp.version, stamp.token, fingerprint, ttl=marker_ttl, by=by)
        with _Renewer(client, prefix, stamp, fingerprint, by, marker_ttl):
            started = time.monotonic()
            image = build_image(client, prefix, build, images, records)
            built = time.monotonic()
            if version is not None and image.stamp.version != version:
                return None
            if not publish_blob(client, prefix, image, fingerprint, chunk_bytes=chunk_bytes):
                return None
    finally:
        # Published, skipped or failed: nothing more to wait for (a waiting engine fetches the
        # blob, or builds from rows at once instead of waiting for the marker to expire).
        with contextlib.suppress(redis.RedisError):
            clear_building(client, prefix, stamp.version, fingerprint)
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


def mark_building(
    client: redis.Redis,
    prefix: str,
    version: int,
    token: str | None,
    fingerprint: str,
    *,
    ttl: float = MARKER_TTL_SECONDS,
    by: str = "",
) -> bool:
    """Mark (or keep marking) ``version``'s image for ``fingerprint`` as being built, for ``ttl``
    seconds of Redis' clock; False if the version is gone (nothing written). Redis errors propagate.

    Engines that need that version and find the marker alive wait for the image instead of
    building the catalogue themselves (``SnapshotHolder``, ``engine.snapshot_image_wait``).
    The producer renews it every :data:`MARKER_RENEW_SECONDS` while it builds and removes it
    when it is done (:func:`clear_building`), whether it published or failed.
    """
    marked = client.register_script(_MARK)(
        keys=[meta_key(prefix, version), image_blob_key(prefix, version)],
        args=[token or "", building_field(fingerprint), int(ttl * 1000), by],
    )
    return bool(marked)


def clear_building(client: redis.Redis, prefix: str, version: int, fingerprint: str) -> None:
    """Remove the marker: the image is published, or will not be (engines stop waiting)."""
    client.hdel(image_blob_key(prefix, version), building_field(fingerprint))


class _Renewer:
    """Renews a marker from a thread while the producer builds (the build holds the GIL, but
    Python hands it over every few milliseconds; the TTL covers long C calls)."""

    def __init__(
        self, client: redis.Redis, prefix: str, stamp: SnapshotStamp, fingerprint: str, by: str, ttl: float
    ):
        self._args = (client, prefix, stamp.version, stamp.token, fingerprint)
        self._by, self._ttl = by, ttl
        self._every = min(MARKER_RENEW_SECONDS, ttl / 6)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="image-marker", daemon=True)

    def __enter__(self) -> _Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not mark_building(*self._args, ttl=self._ttl, by=self._by):
                    return  # the version is gone
            except redis.RedisError:
                log.debug("renewing the image marker failed; next renewal retries", exc_info=True)


# --- the reader -------------------------------------------------------------------------------------


def read_manifest(client: redis.Redis, prefix: str, version: int, fingerprint: str) -> BlobManifest | None:
    """The manifest of ``version``'s blob for ``fingerprint``, or None (none, or unreadable)."""
    raw = client.hget(image_blob_key(prefix, version), fingerprint)
    return None if raw is None else _manifest(raw, version, fingerprint)


def _manifest(raw: Any, version: int, fingerprint: str) -> BlobManifest | None:
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


def poll_image(
    client: redis.Redis, prefix: str, version: int, fingerprint: str, previous: int | None = None
) -> ImagePoll:
    """``version``'s manifest and marker for ``fingerprint``, the current version, when ``version``
    was published, Redis' clock, and whether version ``previous`` (when given) has an image of
    ``fingerprint`` (then a producer of this code exists): one pipelined round trip. Redis errors
    propagate."""
    key = image_blob_key(prefix, version)
    with client.pipeline(transaction=False) as pipe:
        pipe.hget(key, fingerprint)
        pipe.hget(key, building_field(fingerprint))
        pipe.get(pointer_key(prefix))
        pipe.hget(meta_key(prefix, version), "published_at_ms")
        pipe.time()
        pipe.hexists(image_blob_key(prefix, previous if previous is not None else version), fingerprint)
        raw_manifest, raw_marker, current, published, (seconds, micros), imaged = pipe.execute()
    manifest = _manifest(raw_manifest, version, fingerprint) if raw_manifest is not None else None
    marker = None
    if raw_marker is not None:
        try:
            found = json.loads(raw_marker)
            marker = BuildMarker(int(found["until_ms"]), int(found["started_ms"]), str(found.get("by", "")))
        except (TypeError, ValueError, KeyError):
            log.warning("catalogue image marker of version %d unreadable: ignored", version)
    return ImagePoll(
        manifest,
        marker,
        int(current) if current is not None else None,
        int(published) if published is not None else None,
        int(seconds) * 1000 + int(micros) // 1000,
        previous is not None and bool(imaged),
    )


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
