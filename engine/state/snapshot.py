"""The account catalog in Redis as versioned snapshots, switched atomically.

Key layout (``P`` is the configured key prefix, e.g. ``callgate:``)::

    P snapshot:current            string  the current version: the pointer engines read
    P snapshot:next_version       string  INCR counter handing out version numbers
    P snapshot:versions           zset    every version that may own keys (member = score =
                                          version), registered before its first write so
                                          that partial versions can always be found and
                                          cleaned up without SCAN
    P snapshot:events             pub/sub channel; JSON messages
                                          {"type": "snapshot", "version": v, "token": t}
                                          {"type": "changes", "version": v, "changes": n,
                                           "upserts": {entity: [key, ...]},
                                           "deletes": {entity: [key, ...]}}
    P snapshot:{v}:{entity}       hash    field = entity key, value = codec-encoded entity;
                                          one per CatalogData list ("accounts", ...,
                                          "termination_rates"); absent when empty
    P snapshot:{v}:meta           hash    written last, so it marks a complete version:
                                          created_at (ISO UTC), source_version (the
                                          loader's CatalogData.version), token (random, so
                                          a reset Redis that reuses a version number is
                                          still noticed), codec, changes (bumped by each
                                          apply_changes), count:{entity} and
                                          schema:{entity} (comma-joined field names) as
                                          written by publish (apply_changes does not
                                          update the counts), published_at_ms (Redis
                                          TIME, set by the switch)
    P snapshot:{v}:writer         string  lease (PX TTL, refreshed per batch) while a
                                          publisher writes version v
    P snapshot:{v}:image          hash    version v's published catalogue images
                                          (engine.state.imageblob); deleted with v

Entity keys (:func:`entity_key`): declared once in ``engine.model.ENTITY_KEY_FIELDS``:
the ``id`` where the entity has one, else its natural key (forced caller IDs by
``account_id``, speed dials by ``account_id:key``, blocked codes by ``account_id:prefix``).

Publishing (:func:`publish_snapshot`) writes a new version in pipelined batches, then a
Lua script moves the pointer only forward and only to a complete version (its meta
exists and every hash holds exactly the counted fields) and PUBLISHes the event. It
then UNLINKs old versions: it keeps the current one, the ``keep_previous`` versions
published before it, and any version superseded less than ``grace_seconds`` ago, so a
reader still scanning an older version is not cut off. Versions that were never
published (a crashed or superseded publisher) are removed once their writer lease has
expired.

Reading (:func:`read_snapshot`) reads the pointer, HSCANs every hash of that version
(all entity hashes advance together, one pipeline per round), and at the end checks
that the version still exists and is still current; otherwise it retries once with the
new pointer. Versions are immutable apart from :func:`apply_changes`, so a read never
mixes two versions. The returned CatalogData has ``version`` = the snapshot version
(the loader's own version is ``source_version`` in meta) and every list sorted by
entity key.

Single-entity updates (:func:`apply_changes`) HSET/HDEL entities in the current
version's hashes, bump ``changes`` in its meta and publish a ``changes`` event, in one
MULTI/EXEC guarded by WATCH on the pointer and the meta. Watchers compare the
(version, token, changes) stamp, so a lost message is caught by polling.

The client must be a plain (non-cluster) ``redis.Redis``; responses may be bytes or str.

(Why one module of about 700 lines: publishing, reading and single-entity changes all
keep the same invariants on the pointer, the meta and the version list; splitting them
would spread one protocol over several files.)
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import json
import logging
import operator
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import redis

from engine.model import ENTITY_KEY_FIELDS, ENTITY_TYPES, CatalogData, entity_key_getter
from engine.state.codec import decode_joined, decode_joined_records, encode_entity, schema
from engine.state.keys import (
    entity_hash_key,
    image_blob_key,
    meta_key,
    next_version_key,
    pointer_key,
    snapshot_events_channel,
    versions_key,
    writer_key,
)

__all__ = [
    "CODEC",
    "DuplicateEntityKey",
    "Page",
    "RawSnapshot",
    "SchemaMismatch",
    "SnapshotError",
    "SnapshotIntegrityError",
    "SnapshotStamp",
    "SnapshotSuperseded",
    "SnapshotUnavailable",
    "apply_changes",
    "current_stamp",
    "current_version",
    "delete_prefix",
    "entity_key",
    "entity_name",
    "fetch_snapshot",
    "gc_paused",
    "publish_snapshot",
    "read_snapshot",
]

log = logging.getLogger(__name__)

CODEC = "json-array-1"
WRITER_LEASE_MS = 120_000
DEFAULT_SCAN_COUNT = 10_000
# Decode and sort in chunks of this many rows: every C-level call (json.loads, list.sort)
# then takes about a millisecond, so while a reload decodes in a worker thread, the gevent
# hub thread gets the GIL back within milliseconds (a long C call never yields it).
_CHUNK = 2_000

# Entity keys: the fields declared once in engine.model.ENTITY_KEY_FIELDS, joined with ":".
_KEY_FIELDS: dict[str, tuple[str, ...]] = ENTITY_KEY_FIELDS
_NAME_OF: dict[type, str] = {cls: name for name, cls in ENTITY_TYPES.items()}
_SORT_KEY: dict[str, Callable[[Any], Any]] = {
    name: operator.attrgetter(*fields) for name, fields in _KEY_FIELDS.items()
}


class SnapshotError(Exception):
    """Base of the snapshot errors (Redis errors propagate as redis exceptions)."""


class SnapshotUnavailable(SnapshotError):
    """There is no published snapshot, or it vanished while being read (twice)."""


class SnapshotSuperseded(SnapshotError):
    """A newer version became current first: this publish or change was not applied."""


class SnapshotIntegrityError(SnapshotError):
    """The written version is incomplete (e.g. deleted while being written); not switched to."""


class DuplicateEntityKey(SnapshotError, ValueError):
    """Two different entities of one type share a key; the loader must resolve it."""


class SchemaMismatch(SnapshotError):
    """The stored version was written with another field layout than this code's."""


class SnapshotStamp(NamedTuple):
    """What identifies the content of the current snapshot; any difference means reload."""

    version: int
    token: str | None
    changes: int


# --- keys -----------------------------------------------------------------------------------


# The key builders live in engine.state.keys (one module for every Redis name).


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (a whole deployment: snapshots, limits, sync state;
    for private test and load-test prefixes). Returns how many were deleted."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int_or_none(value: bytes | str | None) -> int | None:
    return None if value is None else int(value)


# --- entity keys ----------------------------------------------------------------------------


def entity_name(obj: Any) -> str:
    """The CatalogData list / snapshot hash name of an entity ("accounts", ...)."""
    try:
        return _NAME_OF[type(obj)]
    except KeyError:
        raise TypeError(f"not an entity type of engine.model: {type(obj).__name__}") from None


def entity_key(obj: Any) -> str:
    """The hash field of an entity: its id, or its natural key where it has no id."""
    return _KEY_FUNCS[entity_name(obj)](obj)


_KEY_FUNCS: dict[str, Callable[[Any], str]] = {name: entity_key_getter(name) for name in ENTITY_TYPES}


def _unique_rows(name: str, items: Sequence[Any]) -> tuple[list[str], Sequence[Any]]:
    """(keys, items) of one entity type, exact duplicate rows dropped.

    Raises DuplicateEntityKey if two different entities share a key.
    """
    keys = list(map(_KEY_FUNCS[name], items))
    if len(set(keys)) == len(keys):
        return keys, items
    first: dict[str, Any] = {}
    conflicts: list[str] = []
    for key, obj in zip(keys, items, strict=True):
        if key not in first:
            first[key] = obj
        elif first[key] != obj:
            conflicts.append(key)
    if conflicts:
        raise DuplicateEntityKey(f"{name}: {len(conflicts)} entities with a taken key, e.g. {conflicts[:5]}")
    log.warning("%s: dropped %d exact duplicate rows", name, len(keys) - len(first))
    return list(first), list(first.values())


# --- publish --------------------------------------------------------------------------------

# KEYS: pointer, meta, versions zset, then the entity hashes (KEYS[4..]);
# ARGV: version, events channel, event payload, then the expected HLENs (ARGV[4..], aligned with KEYS).
_SWITCH_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local version = tonumber(ARGV[1])
if version <= current then return {0, current} end
if redis.call('EXISTS', KEYS[2]) == 0 or not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return {-1, current}
end
for i = 4, #KEYS do
  if redis.call('HLEN', KEYS[i]) ~= tonumber(ARGV[i]) then return {-2, i - 3} end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'published_at_ms', now_ms)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {1, current}
"""


def publish_snapshot(
    client: redis.Redis,
    prefix: str,
    data: CatalogData,
    *,
    batch_size: int = 5000,
    keep_previous: int = 1,
    grace_seconds: float = 60.0,
) -> int:
    """Write ``data`` as a new version, make it current, announce it; return the version.

    Raises DuplicateEntityKey (nothing written), SnapshotSuperseded (a newer version
    became current first; this one is removed), SnapshotIntegrityError, CodecError, or
    redis errors (a partial version is then left for the next publish to clean up).
    Cleanup of old versions is best effort: its errors are logged, not raised.
    """
    if batch_size < 1 or keep_previous < 0:
        raise ValueError("batch_size must be >= 1 and keep_previous >= 0")
    rows = {name: _unique_rows(name, getattr(data, name)) for name in ENTITY_TYPES}
    version = int(client.incr(next_version_key(prefix)))
    with client.pipeline(transaction=True) as pipe:
        pipe.zadd(versions_key(prefix), {str(version): version})
        pipe.set(writer_key(prefix, version), "1", px=WRITER_LEASE_MS)
        pipe.execute()
    try:
        _write_entities(client, prefix, version, rows, batch_size)
        counts = {name: len(keys) for name, (keys, _) in rows.items()}
        token = _write_meta(client, prefix, version, data.version, counts)
        _switch(client, prefix, version, token, counts)
    except (redis.RedisError, OSError):
        raise  # Redis is unhealthy: leave the orphan to the next publish
    except BaseException:
        _delete_versions_quietly(client, prefix, [version])
        raise
    try:
        _cleanup(client, prefix, version, keep_previous, grace_seconds)
    except redis.RedisError:
        log.warning("snapshot %d published, cleanup of old versions failed", version, exc_info=True)
    return version


def _write_entities(
    client: redis.Redis,
    prefix: str,
    version: int,
    rows: Mapping[str, tuple[list[str], Sequence[Any]]],
    batch_size: int,
) -> None:
    """HSET all entities, ``batch_size`` rows per pipelined round trip (small types share one)."""
    writer = writer_key(prefix, version)
    with client.pipeline(transaction=False) as pipe:
        pending = 0
        for name, (keys, items) in rows.items():
            hash_key = entity_hash_key(prefix, version, name)
            for start in range(0, len(items), batch_size):
                stop = start + batch_size
                chunk = zip(keys[start:stop], items[start:stop], strict=True)
                pipe.hset(hash_key, mapping={key: encode_entity(obj) for key, obj in chunk})
                pending += min(stop, len(items)) - start
                if pending >= batch_size:
                    pipe.set(writer, "1", px=WRITER_LEASE_MS)
                    pipe.execute()
                    pending = 0
        if pending:
            pipe.execute()


def _write_meta(
    client: redis.Redis, prefix: str, version: int, source_version: int, counts: Mapping[str, int]
) -> str:
    token = secrets.token_hex(8)
    meta: dict[str, str | int] = {
        "created_at": datetime.now(UTC).isoformat(),
        "source_version": str(source_version),
        "token": token,
        "codec": CODEC,
        "changes": 0,
    }
    for name, cls in ENTITY_TYPES.items():
        meta[f"count:{name}"] = counts[name]
        meta[f"schema:{name}"] = ",".join(schema(cls))
    client.hset(meta_key(prefix, version), mapping=dict(meta))  # type: ignore[arg-type]  # stubs: invariant key
    return token


def _switch(client: redis.Redis, prefix: str, version: int, token: str, counts: Mapping[str, int]) -> None:
    """Move the pointer to ``version`` if it is newer and complete; publish the event."""
    names = list(counts)
    payload = json.dumps({"type": "snapshot", "version": version, "token": token})
    result = client.register_script(_SWITCH_LUA)(
        keys=[
            pointer_key(prefix),
            meta_key(prefix, version),
            versions_key(prefix),
            *(entity_hash_key(prefix, version, n) for n in names),
        ],
        args=[version, snapshot_events_channel(prefix), payload, *(counts[n] for n in names)],
    )
    status, detail = int(result[0]), int(result[1])
    if status == 0:
        raise SnapshotSuperseded(f"version {version} not switched to: version {detail} is current")
    if status == -1:
        raise SnapshotIntegrityError(f"version {version} lost its meta or registration while written")
    if status == -2:
        raise SnapshotIntegrityError(f"version {version}: hash {names[detail - 1]} is incomplete")
    log.info("snapshot version %d is current (was %d)", version, detail)


def _cleanup(
    client: redis.Redis, prefix: str, current: int, keep_previous: int, grace_seconds: float
) -> None:
    """UNLINK versions no reader needs any more (see the module docstring)."""
    versions = sorted(int(v) for v in cast(list[bytes], client.zrange(versions_key(prefix), 0, -1)))
    with client.pipeline(transaction=False) as pipe:
        for v in versions:
            pipe.hget(meta_key(prefix, v), "published_at_ms")
            pipe.exists(writer_key(prefix, v))
        pipe.time()
        replies = pipe.execute()
    seconds, micros = replies[-1]
    now_ms = seconds * 1000 + micros // 1000
    published = [(v, int(t)) for v, t in zip(versions, replies[0:-1:2], strict=True) if t is not None]
    leased = {v for v, alive in zip(versions, replies[1:-1:2], strict=True) if alive}
    doomed = _doomed(current, published, leased, versions, keep_previous, int(grace_seconds * 1000), now_ms)
    if doomed:
        _delete_versions(client, prefix, doomed)
        log.info("snapshot cleanup: removed versions %s", doomed)


def _doomed(
    current: int,
    published: list[tuple[int, int]],
    leased: set[int],
    versions: list[int],
    keep_previous: int,
    grace_ms: int,
    now_ms: int,
) -> list[int]:
    """The versions to delete, given (version, published_at_ms) in version order."""
    older = [(v, t) for v, t in published if v < current]
    kept = {v for v, _ in older[len(older) - keep_previous :]} if keep_previous else set()
    published_at = dict(published)
    doomed = []
    for index, (v, _) in enumerate(older):
        superseded_at = older[index + 1][1] if index + 1 < len(older) else published_at.get(current, now_ms)
        if v not in kept and now_ms - superseded_at >= grace_ms:
            doomed.append(v)
    orphans = [v for v in versions if v not in published_at and v != current and v not in leased]
    return sorted(doomed + orphans)


def _delete_versions(client: redis.Redis, prefix: str, versions: Iterable[int]) -> None:
    with client.pipeline(transaction=True) as pipe:
        for v in versions:
            names = [entity_hash_key(prefix, v, n) for n in ENTITY_TYPES]
            pipe.unlink(meta_key(prefix, v), writer_key(prefix, v), image_blob_key(prefix, v), *names)
            pipe.zrem(versions_key(prefix), str(v))
        pipe.execute()


def _delete_versions_quietly(client: redis.Redis, prefix: str, versions: list[int]) -> None:
    try:
        _delete_versions(client, prefix, versions)
    except redis.RedisError:
        log.warning("could not remove snapshot versions %s; the next publish will", versions, exc_info=True)


# --- single-entity changes ------------------------------------------------------------------


def apply_changes(
    client: redis.Redis,
    prefix: str,
    version: int,
    upserts: Iterable[Any],
    deletes: Iterable[tuple[str, str]],
) -> int:
    """Upsert and delete single entities of ``version`` in one MULTI/EXEC; return its changes count.

    ``version`` must be current (else SnapshotSuperseded; redis.WatchError if it moves
    meanwhile: retry with the new current version). Publishes a ``changes`` event.
    A key may not be both upserted and deleted in one call.
    """
    sets: dict[str, dict[str, bytes]] = {}
    for obj in upserts:
        sets.setdefault(entity_name(obj), {})[entity_key(obj)] = encode_entity(obj)
    dels: dict[str, list[str]] = {}
    for name, raw_key in deletes:
        key = str(raw_key)
        if name not in ENTITY_TYPES:
            raise ValueError(f"unknown entity type {name!r}")
        if key in sets.get(name, {}):
            raise ValueError(f"{name} {key!r} is both upserted and deleted")
        dels.setdefault(name, []).append(key)
    meta = meta_key(prefix, version)
    if not sets and not dels:
        return int(client.hget(meta, "changes") or 0)
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(pointer_key(prefix), meta)  # type: ignore[no-untyped-call]
        _check_writable(pipe, prefix, version, list(sets))
        changes = int(pipe.hget(meta, "changes") or 0) + 1
        pipe.multi()
        for name, mapping in sets.items():
            pipe.hset(entity_hash_key(prefix, version, name), mapping=mapping)  # type: ignore[arg-type]
        for name, keys in dels.items():
            pipe.hdel(entity_hash_key(prefix, version, name), *keys)
        pipe.hset(meta, "changes", changes)
        payload = {
            "type": "changes",
            "version": version,
            "changes": changes,
            "upserts": {name: list(mapping) for name, mapping in sets.items()},
            "deletes": dels,
        }
        pipe.publish(snapshot_events_channel(prefix), json.dumps(payload))
        pipe.execute()
    return changes


def _check_writable(pipe: Any, prefix: str, version: int, names: list[str]) -> None:
    """In a WATCHed pipeline: ``version`` is current, complete, and uses this code's schemas."""
    current = _int_or_none(pipe.get(pointer_key(prefix)))
    if current != version:
        raise SnapshotSuperseded(f"version {version} is not current (current: {current})")
    if not names:
        if not pipe.exists(meta_key(prefix, version)):
            raise SnapshotUnavailable(f"version {version} has no meta")
        return
    stored = pipe.hmget(meta_key(prefix, version), [f"schema:{n}" for n in names])
    for name, fields in zip(names, stored, strict=True):
        if fields is None:
            raise SnapshotUnavailable(f"version {version} has no meta/schema for {name}")
        if _str(fields) != ",".join(schema(ENTITY_TYPES[name])):
            raise SchemaMismatch(f"{name}: version {version} was written with fields {_str(fields)!r}")


# --- read -----------------------------------------------------------------------------------


def current_version(client: redis.Redis, prefix: str) -> int | None:
    """The current snapshot version, or None if none was ever published."""
    return _int_or_none(client.get(pointer_key(prefix)))


def current_stamp(client: redis.Redis, prefix: str) -> SnapshotStamp | None:
    """(version, token, changes) of the current snapshot, or None; two round trips."""
    version = current_version(client, prefix)
    if version is None:
        return None
    token, changes = client.hmget(meta_key(prefix, version), ["token", "changes"])
    return SnapshotStamp(version, None if token is None else _str(token), int(changes or 0))


class Page(NamedTuple):
    """Rows of one entity hash as read: their encoded values joined with commas."""

    joined: bytes
    rows: int


@dataclass(slots=True)
class RawSnapshot:
    """One version as read from Redis, not decoded yet (decoding is CPU work: see ``decode``).

    ``values`` holds, per entity hash, its rows in pages of comma-joined values rather
    than one bytes object per row: a million-row read then leaves no million small
    objects behind to fragment the heap (they were ~0.5 GB of RSS that stayed after the
    decode at 1M accounts + 1M rates). A row HSCAN returned twice is decoded twice; the
    decode keeps the last one read (see ``_in_key_order``).
    """

    stamp: SnapshotStamp
    meta: dict[str, str]
    values: dict[str, list[Page]] = field(default_factory=dict)
    confirmed_at: float | None = None  # time.monotonic() when the pointer was seen == version at the end

    @property
    def version(self) -> int:
        return self.stamp.version

    def decode(self, records: Collection[str] = ()) -> CatalogData:
        """Decode every entity (sorted by key); CatalogData.version is the snapshot version.

        The entity types named in ``records`` go into ``CatalogData.records`` instead, as
        :class:`RecordRows` (the tuples of their packed records, decoded while
        ``Catalog.build`` packs them: no list of a million rows is ever held).
        The cyclic GC is paused meanwhile (see :func:`gc_paused`).
        """
        with gc_paused():
            return self._decode(frozenset(records))

    def _decode(self, records: frozenset[str]) -> CatalogData:
        data = CatalogData(version=self.version)
        for name, cls in ENTITY_TYPES.items():
            stored = self.meta.get(f"schema:{name}")
            fields = tuple(stored.split(",")) if stored else None
            if name in records:
                data.records[name] = RecordRows(cls, self.values.get(name, []), fields)
                continue
            items: list[Any] = []
            for page in self.values.get(name, []):
                items += decode_joined(cls, page.joined, page.rows, fields)
            setattr(data, name, _in_key_order(name, items))
        return data


class RecordRows:
    """The rows of one entity hash as record tuples (``codec.decode_joined_records``), decoded
    a page at a time while iterated, in the order read (a row read twice comes twice: the
    consumer keeps the last one of each key). Iterable again while the pages are held."""

    __slots__ = ("_cls", "_fields", "_pages")

    def __init__(self, cls: type, pages: list[Page], fields: tuple[str, ...] | None) -> None:
        self._cls, self._pages, self._fields = cls, pages, fields

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for page in self._pages:
            yield from decode_joined_records(self._cls, page.joined, page.rows, self._fields)


@contextlib.contextmanager
def gc_paused(*, freeze: bool = False) -> Iterator[None]:
    """Pause Python's cyclic GC for a bulk load, restoring its previous state after.

    Decoding allocates millions of acyclic objects; meanwhile every full collection
    rescans the growing heap while holding the GIL (~200 ms each at 1M rates, several
    per decode), stalling all other threads, the gevent hub included. Paused, a 1M-rate
    decode is ~30 % faster and its longest GIL hold is ~15 ms. But the first collection
    after the pause then has to walk all the new objects once (~0.6 s at 1M rates)
    unless ``freeze`` moves them (with everything else alive) into the permanent
    generation (``gc.freeze()``, O(1)): right for a long-lived catalog whose objects
    are acyclic and freed by reference counting when it is replaced.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


def _in_key_order(name: str, items: list[Any]) -> list[Any]:
    """``items`` sorted by entity key, without one long GIL-holding sort of a million rows."""
    key = _SORT_KEY[name]
    if not items:
        return items
    if len(items) <= _CHUNK:
        items.sort(key=key)  # stable: of two reads of one row, the later stays later
        return _last_of_each_key(items, key)
    if _KEY_FIELDS[name] == ("id",):
        placed = _placed_by_id(items)
        if placed is not None:
            return placed
    chunks = [sorted(items[start : start + _CHUNK], key=key) for start in range(0, len(items), _CHUNK)]
    return _last_of_each_key(list(heapq.merge(*chunks, key=key)), key)


def _last_of_each_key(items: list[Any], key: Callable[[Any], Any]) -> list[Any]:
    """Sorted ``items`` with one row per key, the last read (HSCAN may return a row twice)."""
    keys = list(map(key, items))
    if all(map(operator.ne, keys, keys[1:])):
        return items
    following = [*keys[1:], _NO_KEY]
    return [obj for obj, k, after in zip(items, keys, following, strict=True) if k != after]


_NO_KEY = object()


def _placed_by_id(items: list[Any]) -> list[Any] | None:
    """Order by placing each row at its id (O(n), Python loops; a row read twice: the last
    read stays); None if the ids are too sparse."""
    low = high = items[0].id
    for obj in items:
        if obj.id < low:
            low = obj.id
        elif obj.id > high:
            high = obj.id
    if high - low >= 4 * len(items):
        return None
    slots: list[Any] = [None] * (high - low + 1)
    for obj in items:
        slots[obj.id - low] = obj
    return [obj for obj in slots if obj is not None]


def read_snapshot(client: redis.Redis, prefix: str, *, scan_count: int = DEFAULT_SCAN_COUNT) -> CatalogData:
    """The current snapshot, decoded. Raises SnapshotUnavailable if there is none."""
    return fetch_snapshot(client, prefix, scan_count=scan_count).decode()


def fetch_snapshot(
    client: redis.Redis,
    prefix: str,
    *,
    scan_count: int = DEFAULT_SCAN_COUNT,
    on_round: Callable[[int, int], None] | None = None,
) -> RawSnapshot:
    """Read the raw current version, consistently (see the module docstring).

    ``on_round(version, rows_so_far)`` is called after each HSCAN round (progress, tests).
    """
    for attempt in (1, 2):
        version = current_version(client, prefix)
        if version is None:
            raise SnapshotUnavailable("no snapshot has been published")
        raw = _fetch_version(client, prefix, version, scan_count, on_round)
        if raw is None:
            log.info("snapshot version %d vanished while read (attempt %d)", version, attempt)
            continue
        if raw.confirmed_at is None and attempt == 1:
            log.info("snapshot moved on while version %d was read; reading the new one", version)
            continue
        return raw
    raise SnapshotUnavailable("the snapshot vanished while being read, twice")


def _fetch_version(
    client: redis.Redis,
    prefix: str,
    version: int,
    scan_count: int,
    on_round: Callable[[int, int], None] | None,
) -> RawSnapshot | None:
    """All hashes of ``version``; None if it vanished (or was not complete) meanwhile."""
    meta = {_str(k): _str(v) for k, v in client.hgetall(meta_key(prefix, version)).items()}
    if not meta:
        return None
    stamp = SnapshotStamp(version, meta.get("token"), int(meta.get("changes", 0)))
    if meta.get("codec", CODEC) != CODEC:
        raise SchemaMismatch(f"version {version} uses codec {meta['codec']!r}, this code reads {CODEC!r}")
    progress = None if on_round is None else lambda rows: on_round(version, rows)
    fields = _scan_hashes(
        client, [entity_hash_key(prefix, version, n) for n in ENTITY_TYPES], scan_count, progress
    )
    asked_at = time.monotonic()
    with client.pipeline(transaction=False) as pipe:
        pipe.get(pointer_key(prefix))
        pipe.exists(meta_key(prefix, version))
        pointer, exists = pipe.execute()
    if not exists:
        return None
    confirmed_at = asked_at if _int_or_none(pointer) == version else None
    values = dict(zip(ENTITY_TYPES, fields, strict=True))
    return RawSnapshot(stamp, meta, values, confirmed_at)


def _scan_hashes(
    client: redis.Redis,
    keys: list[str],
    count: int,
    progress: Callable[[int], None] | None,
) -> list[list[Page]]:
    """HSCAN all ``keys`` side by side: one pipelined round trip per round.

    Each reply page is joined into :class:`Page` blobs of at most ``_CHUNK`` rows at once,
    so its per-row bytes objects are freed before the next round (and their memory reused
    by it) instead of accumulating. Rows returned twice are kept twice (see RawSnapshot).
    """
    found: list[list[Page]] = [[] for _ in keys]
    cursors = dict.fromkeys(range(len(keys)), 0)
    rows = 0
    while cursors:
        with client.pipeline(transaction=False) as pipe:
            for index, cursor in cursors.items():
                pipe.hscan(keys[index], cursor, count=count)
            replies = pipe.execute()
        for (index, _), (cursor, page) in zip(list(cursors.items()), replies, strict=True):
            values = [_bytes(value) for value in page.values()]
            for start in range(0, len(values), _CHUNK):
                chunk = values[start : start + _CHUNK]
                found[index].append(Page(b",".join(chunk), len(chunk)))
            rows += len(values)
            if int(cursor) == 0:
                del cursors[index]
            else:
                cursors[index] = int(cursor)
        del replies
        if progress is not None:
            progress(rows)
    return found


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value
