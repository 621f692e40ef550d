"""Keeps the engine's in-memory catalog in step with the current Redis snapshot.

:class:`SnapshotHolder` holds the object built from the current snapshot (the rules'
``Catalog.build``, injected as ``build``). ``current`` is a plain attribute read: calls
take ``(version, catalog)`` once and keep using it while a reload swaps in a new tuple,
so a call in flight never sees two catalogs.

``run(stop_event, interval)`` is the background loop (spawn it as a greenlet once the
process is monkey-patched): it subscribes to the snapshot events and follows them, and
also polls the snapshot stamp every ``interval`` seconds, because pub/sub messages sent
while the connection is down are lost. Redis I/O is cooperative under gevent; the
CPU-bound part of a full load (decoding a million rows and ``build``) runs in gevent's
thread pool so the hub keeps serving calls meanwhile.

Two kinds of update:

* a new snapshot version (``snapshot`` event, or a stamp with another version/token):
  full load, swapped in whole (a rate-deck import becomes visible all at once): mapped from a
  local image, else fetched from the image published in Redis, after waiting for it while its
  producer marks it as being built (``image_wait``), else decoded and built from rows;
* single-entity changes to the held version (``changes`` events of the live sync, each
  numbered by the version's change count): if the built object supports it
  (``track_changes(data)`` after the build, ``apply_changes(upserts, deletes, before)``:
  ``engine.rules.catalog.Catalog`` does), the changed entities are fetched in one
  pipelined round trip and applied **in place**, without yielding, so under gevent no
  decision sees half a change. Consecutive events are applied together. A gap in the
  change numbers (a lost message, or changes made while a full load was read) is filled
  from the sync journal (``{prefix}sync:journal``); if it cannot be, or the object does
  not support changes, the whole version is loaded again.

``last_confirmed`` is the ``time.monotonic()`` at which Redis was last seen pointing at
exactly the held content (version, token and change count); the engine refuses to decide
from a snapshot unconfirmed for longer than its configured bound (``confirmed_age``).
While the successor of a held version is being loaded (``switching_since`` is set), the held
one is superseded but not lost: the decider allows it a longer bound
(``engine.decider.snapshot_distrust``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable
from functools import partial
from typing import Any, Generic, Protocol, TypeVar, cast

import redis

from engine.model import ENTITY_TYPES, CatalogData
from engine.state.codec import decode_entity, decode_many
from engine.state.image import ImageError, ImageStore, LoadedImage
from engine.state.imageblob import (
    BlobManifest,
    BlobUnusable,
    blob_chunks,
    poll_image,
    read_manifest,
)
from engine.state.keys import entity_hash_key, image_blob_key, snapshot_events_channel, sync_journal_key
from engine.state.snapshot import (
    DEFAULT_SCAN_COUNT,
    RawSnapshot,
    SnapshotStamp,
    SnapshotUnavailable,
    current_stamp,
    fetch_snapshot,
    gc_paused,
)

__all__ = ["SnapshotHolder", "StopEvent"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_MAX_WAIT = 1.0  # longest single wait, so that stop_event is honoured within about a second
_SUBSCRIBE_TIMEOUT = 10.0
_JOURNAL_SLACK = 100  # journal entries read beyond the ones a gap needs
_RATE_ENTITIES = ("origination_rates", "termination_rates")  # their changes need before-images
# Failures that say Redis itself did not answer (refused, reset, timed out), as opposed
# to a load or build that failed while Redis answered.
_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# A version published this recently with no "being built" mark, while the held version has an
# image of this code (so a producer exists): its producer (the sync worker's leader marks it right
# after the publish) may be milliseconds away from marking it. Waited for at most this long. No
# grace where the held version has no image (no producer: sync.publish_images = false, only
# sync --once) or nothing is held (a first start: a version seconds old is rare there).
_MARKER_GRACE = 3.0
_MAX_WAITS = 4  # versions waited for in one load (each superseding the last): then rows
_OFFLOAD_DECODE = 200  # changes of more entities are decoded in the thread pool (the hub keeps serving)


class StopEvent(Protocol):
    """threading.Event or gevent.event.Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...


def offload_to_threadpool(fn: Callable[[], R]) -> R:
    """Run CPU-bound ``fn`` in gevent's thread pool when gevent has patched threading, else inline."""
    from gevent import get_hub, monkey

    if monkey.is_module_patched("threading"):
        result: R = get_hub().threadpool.apply(fn)
        return result
    return fn()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call, nothing to gain
        return None
    trim.argtypes = [ctypes.c_size_t]  # type: ignore[attr-defined]
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``), after a full load.

    A load frees a lot at once: the raw snapshot pages, the decoder's temporaries (in the
    thread pool's own malloc arenas) and the previous catalogue. glibc keeps such memory
    for reuse, so the process's RSS would stay at the load's peak (old and new catalogue
    together) until the next load. Blocks for milliseconds: run it off the hub thread (ctypes
    releases the GIL meanwhile).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class SnapshotHolder(Generic[T]):
    """The engine's current catalog, reloaded or updated from Redis when its snapshot changes."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        build: Callable[[CatalogData], T],
        *,
        subscribe: bool = True,
        offload: Callable[[Callable[[], Any]], Any] = offload_to_threadpool,
        scan_count: int = DEFAULT_SCAN_COUNT,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        probe_interval: float = 0.25,
        freeze_gc: bool = True,
        on_swap: Callable[[int, T], None] | None = None,
        on_change: Callable[[int, T, dict[str, set[str]]], None] | None = None,
        images: ImageStore | None = None,
        image_blobs: bool = False,
        records: Collection[str] = (),
        image_wait: float = 0.0,
        image_poll: float = 1.0,
    ) -> None:
        """``build`` turns CatalogData into what ``current`` serves (``Catalog.build``).

        ``subscribe=False`` polls only. ``offload`` runs decode+build (default: gevent's
        thread pool when monkey-patched). ``freeze_gc`` pauses the cyclic GC during
        decode+build and then ``gc.freeze()``s the result, so that no collection ever
        walks the catalog's millions of objects while holding the GIL (see
        :func:`engine.state.snapshot.gc_paused`; process-wide, hence switchable).
        After a failure the loop waits with exponential backoff (``backoff_initial`` up
        to ``backoff_max`` seconds), but pings Redis every ``probe_interval`` seconds
        meanwhile and retries at once when Redis answers again after an outage.
        ``on_swap(version, value)`` is called after each full load, ``on_change(version,
        value, {entity: keys})`` after each in-place change (metrics, logging, tests).
        ``images``: where built catalogues are written after a full load and mapped from
        instead of loading a version again (``engine.state.image``); None = never.
        ``image_blobs``: without a usable local image, fetch the one published in Redis
        (``engine.state.imageblob``) before loading the rows; needs ``images`` (whose
        directory may be None: the fetched image is then read from memory).
        ``records``: entity types ``build`` takes as packed record tuples
        (``CatalogData.records``, ``RawSnapshot.decode``) rather than as entities.
        ``image_wait``: with ``image_blobs``, how long to wait at most for the image of a version
        that its producer marks as being built (``engine.imageblob.mark_building``) rather than
        build the catalogue from rows here too; polled every ``image_poll`` seconds (one round
        trip). 0 = never wait.
        """
        self._client = client
        self._prefix = prefix
        self._build = build
        self._subscribe = subscribe
        self._offload = offload
        self._scan_count = scan_count
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._probe_interval = probe_interval
        self._redis_answered = True  # as last seen by a probe (see _wait_to_retry)
        self._freeze_gc = freeze_gc
        self._on_swap = on_swap
        self._on_change = on_change
        self._images = images
        self._image_blobs = image_blobs
        self._image_wait = image_wait if image_blobs and images is not None else 0.0
        self._image_poll = image_poll
        self._stop_event: StopEvent | None = None  # run()'s: a wait for an image ends with it
        self.blob_waits: dict[str, int] = {}  # outcome of each wait for an image -> count (tests, logs)
        self.blob_waited = 0.0  # seconds spent waiting for images, in all
        self.blob_fetches = 0  # published images looked for (tests, logs)
        self.blob_failures = 0  # published images found but unusable
        self._records = tuple(records)
        self._lock = threading.RLock()  # a gevent lock once monkey-patched
        self._state: tuple[int, T] | None = None
        self._stamp: SnapshotStamp | None = None
        self._schemas: dict[str, tuple[str, ...] | None] = {}  # field lists the held version was written with
        self._incremental = False  # the held value takes apply_changes
        self._recheck = False
        self.last_confirmed: float | None = None
        # time.monotonic() at which a full load of another version began while one was held (a
        # bulk import, a flushed Redis): the held catalogue still serves meanwhile; None otherwise.
        self.switching_since: float | None = None
        self.loaded_at: float | None = None
        self.changed_at: float | None = None  # time.monotonic() of the last in-place change
        self.failures = 0  # length of the current failure streak of run()
        self.full_loads = 0
        self.changes_applied = 0  # change events applied in place

    # --- reading, no I/O ---------------------------------------------------------------------

    @property
    def current(self) -> tuple[int, T]:
        """(snapshot version, built catalog); raises SnapshotUnavailable before the first load."""
        state = self._state
        if state is None:
            raise SnapshotUnavailable("no snapshot loaded yet")
        return state

    @property
    def loaded(self) -> bool:
        return self._state is not None

    @property
    def stamp(self) -> SnapshotStamp | None:
        """The (version, token, changes) of the held snapshot."""
        return self._stamp

    def confirmed_age(self, now: float | None = None) -> float:
        """Seconds since Redis was last seen at the held snapshot (inf if never)."""
        if self.last_confirmed is None:
            return math.inf
        return (time.monotonic() if now is None else now) - self.last_confirmed

    # --- reloading ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Catch up with the Redis snapshot if it differs from the held one; True if anything changed.

        Changes to the held version are applied in place when possible, else the whole
        snapshot is loaded. Raises SnapshotUnavailable if nothing was ever published,
        redis errors, and whatever decoding or ``build`` raise; the held catalog is then kept.
        """
        with self._lock:
            asked_at = time.monotonic()
            stamp = current_stamp(self._client, self._prefix)
            if stamp is None:
                raise SnapshotUnavailable("no snapshot has been published")
            if stamp == self._stamp:
                self.last_confirmed = asked_at
                self._recheck = False
                return False
            if self._follows(stamp) and self._catch_up_from_journal(stamp.changes):
                if self._stamp == stamp:
                    self.last_confirmed = asked_at
                    self._recheck = False
                return True
            if self._state is not None:
                self.switching_since = asked_at
            try:
                self._load()
            finally:
                self.switching_since = None
            return True

    def _follows(self, stamp: SnapshotStamp) -> bool:
        """True if ``stamp`` is the held version with more changes, and changes can be applied."""
        held = self._stamp
        return (
            self._incremental
            and held is not None
            and stamp.version == held.version
            and stamp.token == held.token
            and stamp.changes > held.changes
        )

    def _load(self) -> None:
        if self._images is not None and self._load_image(self._images):
            return
        started = time.monotonic()
        raw = fetch_snapshot(self._client, self._prefix, scan_count=self._scan_count)
        fetched = time.monotonic()
        schemas = {name: _fields(raw.meta.get(f"schema:{name}")) for name in ENTITY_TYPES}
        value, incremental = self._offload(lambda: self._decode_and_build(raw, schemas))
        self._state = (raw.version, value)  # one reference swap: readers see old or new, whole
        self._stamp = raw.stamp
        self._schemas = schemas
        self._incremental = incremental
        self.loaded_at = time.monotonic()
        self.full_loads += 1
        # If the pointer moved on during the read, the held version is complete but not current.
        self._recheck = raw.confirmed_at is None
        if raw.confirmed_at is not None:
            self.last_confirmed = raw.confirmed_at
        log.info(
            "snapshot version %d loaded (changes %d): fetch %.2fs, decode+build %.2fs",
            raw.version,
            raw.stamp.changes,
            fetched - started,
            self.loaded_at - fetched,
        )
        # Freed by now: the previous catalogue (unless a call still holds it), and the raw pages.
        raw.values.clear()
        self._offload(release_free_memory)
        if self._on_swap is not None:
            self._on_swap(raw.version, value)

    def _decode_and_build(
        self, raw: RawSnapshot, schemas: dict[str, tuple[str, ...] | None]
    ) -> tuple[T, bool]:
        if not self._freeze_gc:
            built = self._build_tracked(raw.decode(self._records))
        else:
            with gc_paused(freeze=True):
                built = self._build_tracked(raw.decode(self._records))
        if self._images is not None and built[1] and self._images.write(raw.stamp, (built[0], schemas)):
            # Written before the catalogue is shared (from then on live changes alter it), then
            # served from the file like every other process of the host: the pages are shared,
            # and the private copy just built is freed.
            mapped = self._images.load(raw.stamp)
            if mapped is not None:
                value: T = mapped.value[0]
                return value, True
        return built

    def _load_image(self, images: ImageStore) -> bool:
        """Map the current version's image if there is one, then catch up with the journal.

        No usable local image: the image published in Redis (``engine.state.imageblob``), if
        there is one for this code, written into the image directory (then mapped from it)
        or, without a directory, read from memory. False (nothing held changed) if there is
        no usable image, or if the changes made since it was written are no longer all in
        the journal: the caller loads from Redis.
        """
        started = time.monotonic()
        first = current_stamp(self._client, self._prefix)
        if first is None:
            return False
        stamp: SnapshotStamp = first
        loaded = self._offload(partial(self._map_local, images, stamp))
        waits = 0
        while loaded is None and self._image_wait > 0 and waits < _MAX_WAITS:
            waits += 1
            outcome = self._await_image(images, stamp)
            if outcome == "stopping":
                raise SnapshotUnavailable("stopping while waiting for a catalogue image")
            if outcome == "none":
                break
            # Waited: the count of changes (or the version: "superseded") moved on meanwhile.
            started = time.monotonic()
            fresh = current_stamp(self._client, self._prefix)
            if fresh is None:
                return False
            stamp = fresh
            # Another process of the host may have fetched it meanwhile: its file, if it made one.
            loaded = self._offload(partial(self._map_local, images, stamp))
            if outcome == "ready":
                break
        if loaded is None and self._image_blobs:
            loaded = self._fetch_blob(images, stamp)
        if loaded is None:
            return False
        value, schemas = loaded.value
        if not callable(getattr(value, "apply_changes", None)):
            return False
        previous = (self._state, self._stamp, self._schemas, self._incremental)
        self._state, self._stamp, self._schemas = (stamp.version, value), loaded.stamp, schemas
        self._incremental = True
        try:
            caught_up = loaded.stamp.changes == stamp.changes or self._catch_up_from_journal(stamp.changes)
        except BaseException:  # Redis failed meanwhile: hold what was held before, as after any failure
            self._state, self._stamp, self._schemas, self._incremental = previous
            raise
        if not caught_up:
            self._state, self._stamp, self._schemas, self._incremental = previous
            return False
        self.loaded_at = time.monotonic()
        self.full_loads += 1
        # Current when the load began: the run loop checks again at once (a fetch takes seconds).
        self._recheck = True
        if self._stamp == stamp:
            self.last_confirmed = started
        log.info(
            "snapshot version %d mapped from %s (changes %d, %d more from the journal) in %.2fs",
            stamp.version,
            loaded.path,
            loaded.stamp.changes,
            stamp.changes - loaded.stamp.changes,
            self.loaded_at - started,
        )
        if self._on_swap is not None:
            self._on_swap(stamp.version, value)
        return True

    def _await_image(self, images: ImageStore, stamp: SnapshotStamp) -> str:
        """Wait while a live producer builds ``stamp``'s image for this code (its marker).

        Polls the version's image hash every ``image_poll`` seconds (one round trip on the
        snapshot connection; cooperative under gevent) for at most ``image_wait`` seconds.
        Returns "ready" (the manifest is there: fetch it), "superseded" (a newer version is
        current: look at that one), "none" (no wait, or no more: no marker, a stale one, a
        marker removed without an image, the time is up; the caller builds from rows) or
        "stopping" (run()'s stop event). Redis errors propagate (a failed load).
        """
        begun = time.monotonic()
        deadline = begun + self._image_wait
        held = self._held_version()
        outcome, seen, slept = "none", False, False
        try:
            while True:
                poll = poll_image(self._client, self._prefix, stamp.version, images.fingerprint, held)
                if poll.current is not None and poll.current != stamp.version:
                    outcome = "superseded"
                    return outcome
                if poll.manifest is not None:
                    outcome = "ready"
                    return outcome
                if poll.building:
                    seen = True
                elif poll.marker is not None:
                    log.warning(
                        "the producer of version %d's catalogue image (%s) died or hangs: its mark "
                        "expired %.1fs ago; building from rows",
                        stamp.version,
                        poll.marker.by,
                        (poll.now_ms - poll.marker.until_ms) / 1000,
                    )
                    outcome = "stale"
                    return "none"
                elif seen:
                    log.info(
                        "catalogue image of version %d not published after all: building from rows",
                        stamp.version,
                    )
                    outcome = "abandoned"
                    return "none"
                elif (
                    not poll.previous_imaged
                    or poll.published_ms is None
                    or poll.now_ms - poll.published_ms >= _MARKER_GRACE * 1000
                ):
                    outcome = "unmarked"  # no producer for this version and code
                    return "none"
                # else: published moments ago, and the held version had an image of this code (a
                # producer exists): its mark may be a few milliseconds away
                if time.monotonic() + self._image_poll > deadline:
                    log.warning(
                        "catalogue image of version %d still being built after %.0fs: building from rows",
                        stamp.version,
                        time.monotonic() - begun,
                    )
                    outcome = "timeout"
                    return "none"
                slept = True
                if self._stop_event is not None:
                    self._stop_event.wait(self._image_poll)
                    if self._stop_event.is_set():
                        outcome = "stopping"
                        return outcome
                else:
                    time.sleep(self._image_poll)  # gevent's once monkey-patched
        finally:
            waited = time.monotonic() - begun
            if outcome != "unmarked" and (slept or outcome != "ready"):  # a wait, or news
                self.blob_waits[outcome] = self.blob_waits.get(outcome, 0) + 1
                self.blob_waited += waited
                log.info(
                    "waited %.1fs for the catalogue image of version %d: %s", waited, stamp.version, outcome
                )

    def _fetch_blob(self, images: ImageStore, stamp: SnapshotStamp) -> LoadedImage | None:
        """The current version's image published in Redis, fetched and checked; None if there
        is none for this code or it is unusable (a chunk missing, a failed check: logged).

        The chunks are read here (cooperative I/O under gevent, one chunk per round trip on
        the snapshot connection); the checks and the unpickling run in the thread pool.
        Redis errors propagate (a failed load: the watcher retries).
        """
        if images.directory is None:
            return self._fetch_blob_unlocked(images, stamp)
        with images.host_lock() as waited:
            if waited:  # another process of the host fetched meanwhile: its file, if it made one
                local = self._offload(lambda: self._map_local(images, stamp))
                if local is not None:
                    return cast(LoadedImage, local)
            return self._fetch_blob_unlocked(images, stamp)

    def _map_local(self, images: ImageStore, stamp: SnapshotStamp) -> LoadedImage | None:
        with gc_paused(freeze=self._freeze_gc):
            return images.load(stamp)

    def _fetch_blob_unlocked(self, images: ImageStore, stamp: SnapshotStamp) -> LoadedImage | None:
        started = time.monotonic()
        self.blob_fetches += 1
        manifest = read_manifest(self._client, self._prefix, stamp.version, images.fingerprint)
        if manifest is None or manifest.token != stamp.token or manifest.changes > stamp.changes:
            log.info("no catalogue image of version %d published for this code: loading rows", stamp.version)
            return None
        chunks = blob_chunks(self._client, self._prefix, stamp.version, manifest)
        origin = f"redis {image_blob_key(self._prefix, stamp.version)} {manifest.fingerprint}"
        try:
            if images.directory is not None:
                path = images.write_chunks(stamp._replace(changes=manifest.changes), chunks)
                if path is None:  # the directory is not writable: keep it in memory after all
                    return self._fetch_blob_to_memory(images, stamp, manifest, origin)
                fetched = time.monotonic()
                loaded: LoadedImage | None = self._offload(lambda: self._map_local(images, stamp))
                if loaded is None:  # the file did not check out (it is removed): logged by load
                    self.blob_failures += 1
            else:
                buffer = _joined(chunks, manifest.size)
                fetched = time.monotonic()
                loaded = self._offload(lambda: self._blob_from_memory(images, buffer, stamp, origin))
        except (BlobUnusable, ImageError) as exc:
            self.blob_failures += 1
            log.warning(
                "catalogue image of version %d in Redis unusable (%s): loading rows", stamp.version, exc
            )
            return None
        if loaded is not None:
            log.info(
                "image of version %d fetched from Redis: %.1f MB in %d chunks, %.2fs (+%.2fs checks)",
                stamp.version,
                manifest.size / 1e6,
                manifest.chunks,
                fetched - started,
                time.monotonic() - fetched,
            )
        return loaded

    def _fetch_blob_to_memory(
        self, images: ImageStore, stamp: SnapshotStamp, manifest: BlobManifest, origin: str
    ) -> LoadedImage | None:
        buffer = _joined(blob_chunks(self._client, self._prefix, stamp.version, manifest), manifest.size)
        loaded: LoadedImage = self._offload(lambda: self._blob_from_memory(images, buffer, stamp, origin))
        return loaded

    def _blob_from_memory(
        self, images: ImageStore, buffer: bytearray, stamp: SnapshotStamp, origin: str
    ) -> LoadedImage:
        with gc_paused(freeze=self._freeze_gc):
            return images.load_buffer(buffer, stamp, origin)

    def _build_tracked(self, data: CatalogData) -> tuple[T, bool]:
        value = self._build(data)
        track = getattr(value, "track_changes", None)
        if track is None or not callable(getattr(value, "apply_changes", None)):
            return value, False
        track(data)
        return value, True

    # --- single-entity changes ---------------------------------------------------------------

    def apply_events(self, payloads: Iterable[dict[str, Any]]) -> bool:
        """Apply ``changes`` event payloads (in any order) to the held catalog, or refresh.

        Payloads of other versions, or already applied, are skipped. Returns True if the
        held catalog changed. Errors as :meth:`refresh`.
        """
        with self._lock:
            held = self._stamp
            if held is None:
                return self.refresh()
            mine: dict[int, dict[str, Any]] = {}
            for payload in payloads:
                token = payload.get("token")
                if payload.get("version") != held.version or (token is not None and token != held.token):
                    return self.refresh()  # another version: a snapshot event follows or preceded
                if int(payload.get("changes", 0)) > held.changes:
                    mine[int(payload["changes"])] = payload
            if not mine:
                return False
            if not self._incremental:
                return self.refresh()
            ordered = [mine[c] for c in sorted(mine)]
            if int(ordered[0]["changes"]) != held.changes + 1 or len(ordered) != len(
                range(held.changes + 1, max(mine) + 1)
            ):
                return self.refresh()  # a gap: the journal has the missing events
            if not self._apply(ordered):
                self._load()
            return True

    def _catch_up_from_journal(self, target: int) -> bool:
        """Apply the journal's events after the held change count, up to at least ``target``."""
        held = self._stamp
        assert held is not None
        needed = target - held.changes
        entries = self._client.xrevrange(sync_journal_key(self._prefix), count=needed + _JOURNAL_SLACK)
        found: dict[int, dict[str, Any]] = {}
        for _, fields in cast(list[tuple[Any, dict[Any, Any]]], entries or []):
            try:
                payload = json.loads(fields.get(b"payload") or fields.get("payload"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if payload.get("version") != held.version or payload.get("token", held.token) != held.token:
                continue
            changes = int(payload.get("changes", 0))
            if changes > held.changes:
                found[changes] = payload
        wanted = range(held.changes + 1, target + 1)
        if any(c not in found for c in wanted):
            log.info(
                "changes %d..%d of version %d are not all in the journal: loading it whole",
                held.changes + 1,
                target,
                held.version,
            )
            return False
        top = target
        while top + 1 in found:  # newer ones read along: apply them too
            top += 1
        return self._apply([found[c] for c in range(held.changes + 1, top + 1)])

    def _apply(self, payloads: list[dict[str, Any]]) -> bool:
        """Fetch the entities the payloads name and apply them in place; False = load whole."""
        held = self._stamp
        state = self._state
        assert held is not None and state is not None
        keys: dict[str, set[str]] = {}
        before_raw: dict[tuple[str, str], str | None] = {}
        for payload in payloads:
            for section in ("upserts", "deletes"):
                for name, names_keys in (payload.get(section) or {}).items():
                    keys.setdefault(name, set()).update(map(str, names_keys))
            for name, images in (payload.get("before") or {}).items():
                for key, image in images.items():
                    before_raw.setdefault((name, str(key)), image)  # the oldest: what the catalog holds
        if any(name not in ENTITY_TYPES for name in keys):
            return False
        if any((name, key) not in before_raw for name in _RATE_ENTITIES for key in keys.get(name, ())):
            return False  # not written by the sync worker: no before-images to find the rates by
        names = sorted(keys)
        ordered = {name: sorted(keys[name]) for name in names}
        with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(entity_hash_key(self._prefix, held.version, name), ordered[name])
            replies = pipe.execute()

        def decode() -> tuple[list[Any], list[tuple[str, str]], dict[tuple[str, str], Any]]:
            upserts: list[Any] = []
            deletes: list[tuple[str, str]] = []
            for name, values in zip(names, replies, strict=True):
                cls, schema = ENTITY_TYPES[name], self._schemas.get(name)
                present = [v for v in values if v is not None]
                upserts += decode_many(cls, present, schema) if present else []
                deletes += [(name, key) for key, v in zip(ordered[name], values, strict=True) if v is None]
            before = {
                (name, key): None
                if image is None
                else decode_entity(ENTITY_TYPES[name], image.encode(), self._schemas.get(name))
                for (name, key), image in before_raw.items()
                if name in _RATE_ENTITIES
            }
            return upserts, deletes, before

        try:
            count = sum(len(k) for k in keys.values())
            upserts, deletes, before = self._offload(decode) if count > _OFFLOAD_DECODE else decode()
            version, value = state
            value.apply_changes(upserts, deletes, before)  # type: ignore[attr-defined]  # no yield inside
        except (ValueError, TypeError):
            log.warning(
                "could not apply changes to version %d in place; loading it whole",
                held.version,
                exc_info=True,
            )
            return False
        self._stamp = held._replace(changes=int(payloads[-1]["changes"]))
        self.changed_at = time.monotonic()
        self.changes_applied += len(payloads)
        if self._on_change is not None:
            self._on_change(version, value, keys)
        return True

    # --- the background loop -----------------------------------------------------------------

    def run(self, stop_event: StopEvent, interval: float = 5.0) -> None:
        """Follow the snapshot until ``stop_event`` is set: pub/sub events plus polling.

        Never raises (except BaseException): failures are logged once per streak and
        retried with exponential backoff.
        """
        pubsub: Any = None
        next_check = 0.0
        self._stop_event = stop_event
        try:
            while not stop_event.is_set():
                try:
                    if pubsub is None and self._subscribe:
                        pubsub = self._open_pubsub()
                        next_check = 0.0  # events may have been missed while unsubscribed
                    if self._recheck or time.monotonic() >= next_check:
                        self.refresh()
                        next_check = time.monotonic() + interval
                    self._recovered()
                    if self._follow_events(pubsub, stop_event, next_check):
                        next_check = 0.0
                except Exception as exc:  # the loop must survive anything
                    self._close_pubsub(pubsub)
                    pubsub, next_check = None, 0.0
                    self._wait_to_retry(stop_event, self._failed(exc))
        finally:
            self._close_pubsub(pubsub)

    def _wait_to_retry(self, stop_event: StopEvent, delay: float) -> None:
        """Wait ``delay`` seconds before the next attempt, unless Redis comes back first.

        The backoff keeps a failing *load* (Redis answers, the load or build does not
        succeed) from being repeated in a tight loop. It must not keep the engine
        refusing calls once an outage is over: during the wait Redis is pinged every
        ``probe_interval`` seconds, and when it answers after it did not, the wait ends
        at once (and the backoff starts again near ``backoff_initial``). Recovery after
        an outage therefore takes about one probe interval, whatever the backoff grew to.
        """
        deadline = time.monotonic() + delay
        while not stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            stop_event.wait(min(remaining, self._probe_interval))
            if stop_event.is_set():
                return
            answers = self._redis_answers()
            came_back = answers and not self._redis_answered
            self._redis_answered = answers
            if came_back:
                log.info("Redis answers again: retrying the snapshot watch now")
                self.failures = min(self.failures, 1)
                return

    def _redis_answers(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # any failure means "not answering"; the next probe asks again
            return False

    def _open_pubsub(self) -> Any:
        """Subscribe and wait for Redis to confirm, so no event after the next check is missed."""
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(snapshot_events_channel(self._prefix))
            deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
            while (message := pubsub.get_message(timeout=_MAX_WAIT)) is None or message[
                "type"
            ] != "subscribe":
                if time.monotonic() > deadline:
                    raise TimeoutError("no confirmation of the snapshot events subscription")
        except BaseException:
            self._close_pubsub(pubsub)
            raise
        return pubsub

    @staticmethod
    def _close_pubsub(pubsub: Any) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection may fail too
                log.debug("closing the snapshot subscription failed", exc_info=True)

    def _follow_events(self, pubsub: Any, stop_event: StopEvent, next_check: float) -> bool:
        """Wait until the next poll (at most _MAX_WAIT) and handle what arrives meanwhile.

        A burst is handled at once: consecutive ``changes`` events with one fetch and one
        in-place update. Returns True if the snapshot must be checked now: on a snapshot
        event, an unreadable one, and a ``subscribe`` confirmation (redis-py reconnects a
        broken subscription by itself, and events sent meanwhile are lost).
        """
        timeout = min(max(next_check - time.monotonic(), 0.0), _MAX_WAIT)
        if pubsub is None:
            stop_event.wait(timeout)
            return False
        message = pubsub.get_message(timeout=timeout)
        if message is None:
            return False
        changes: list[dict[str, Any]] = []
        check = False
        while message is not None:
            payload = _changes_payload(message)
            if payload is not None:
                changes.append(payload)
            else:
                check = True
            message = pubsub.get_message(timeout=0.0)
        if changes and not check:
            self.apply_events(changes)
        return check

    def _failed(self, exc: Exception) -> float:
        """Log (once per streak) and return the backoff delay."""
        self.failures += 1
        if isinstance(exc, _UNREACHABLE):
            self._redis_answered = False  # so the first probe that succeeds ends the wait
        if self.failures == 1:
            log.warning(
                "snapshot watch failed, keeping version %s: %r", self._held_version(), exc, exc_info=True
            )
        else:
            log.debug("snapshot watch failed again (%d): %r", self.failures, exc)
        delay: float = min(self._backoff_max, self._backoff_initial * 2.0 ** (self.failures - 1))
        return delay * random.uniform(0.8, 1.2)

    def _recovered(self) -> None:
        if self.failures:
            log.info("snapshot watch recovered after %d failures", self.failures)
            self.failures = 0

    def _held_version(self) -> int | None:
        state = self._state
        return None if state is None else state[0]


def _changes_payload(message: dict[str, Any]) -> dict[str, Any] | None:
    """The payload of a ``changes`` event message, else None."""
    if message.get("type") != "message":
        return None
    try:
        payload = json.loads(message["data"])
    except (TypeError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("type") == "changes" else None


def _joined(chunks: Iterable[bytes], size: int) -> bytearray:
    """The chunks in one buffer of ``size`` bytes, allocated once (no growth: no peak of twice
    the image); BlobUnusable if they do not add up to it."""
    buffer = bytearray(size)
    offset = 0
    for chunk in chunks:
        if offset + len(chunk) > size:
            raise BlobUnusable("the chunks add up to more than the manifest's size")
        buffer[offset : offset + len(chunk)] = chunk
        offset += len(chunk)
    if offset != size:
        raise BlobUnusable(f"the chunks add up to {offset} bytes, not {size}")
    return buffer


def _fields(stored: str | None) -> tuple[str, ...] | None:
    return tuple(stored.split(",")) if stored else None
