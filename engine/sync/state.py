"""The sync worker's state in Redis, next to the snapshot it maintains.

Keys (``P`` is the configured key prefix)::

    P sync:state     hash    what the current snapshot reflects (:class:`SyncState`): the
                             snapshot version and token it belongs to, the PostgreSQL
                             snapshot (pg_snapshot text) the data was read at, the source
                             database, the change count and timings of the last apply
    P sync:leader    string  the leader lease: the worker id, with a PX expiry
    P sync:journal   stream  every change event also published on the snapshot events
                             channel (field ``payload``), capped (MAXLEN ~): an engine that
                             missed a message reads it back from here

Every write of the worker is a compare-and-set on ``sync:state``: :func:`apply_batch`
is one Lua script that applies only if the state is still the one the batch was
computed from (same version, token, source and pg_snapshot), the pointer still at that
version and the version written with this code's field lists. The entity writes, the
meta change count, the new state, the journal entry and the PUBLISH happen in that one
atomic script, so the state never claims data that is not there, and two workers can
never apply over each other (the loser recomputes from the winner's state). A full
publish writes the state right after the switch, only if the pointer is still at its
version (:func:`record_publish`, WATCH/MULTI).

Change events extend ``engine.state.snapshot``'s ``changes`` events with ``token``,
``before`` (the previous encoded value of every changed origination and termination
rate, ``null`` when there was none: the engine's rate indexes are found from it) and
``sync`` (versions and times, for lag metrics).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis

from engine.model import ENTITY_TYPES
from engine.state.codec import encode_entity, schema
from engine.state.keys import (
    entity_hash_key,
    meta_key,
    pointer_key,
    snapshot_events_channel,
    snapshot_namespace,
    sync_journal_key,
    sync_leader_key,
    sync_state_key,
)
from engine.state.snapshot import SchemaMismatch, SnapshotSuperseded, entity_key, entity_name

__all__ = [
    "BEFORE_IMAGE_ENTITIES",
    "LeaderLease",
    "StateMoved",
    "SyncState",
    "apply_batch",
    "read_position",
    "read_state",
    "record_publish",
]

# The entities whose change events carry the previous value (see the module docstring).
BEFORE_IMAGE_ENTITIES = ("origination_rates", "termination_rates")


class StateMoved(Exception):
    """The sync state changed since it was read (another writer, a publish, a flush)."""


@dataclass(frozen=True, slots=True)
class SyncState:
    version: int  # the snapshot version this state describes
    token: str  # that version's meta token (a reset Redis may reuse version numbers)
    pg_snapshot: str  # the PostgreSQL snapshot the version's data reflects ("xmin:xmax:xip,...")
    source: str  # the database it was read from (a restored or other database is not comparable)
    changes: int = 0  # the version's meta change count after the last apply
    change_version: int = 0  # the highest change version applied (callgate_change_seq)
    applied_at_ms: int = 0  # Redis TIME of the last write (apply, or the publish)
    change_at_ms: int = 0  # when the newest applied change was written in PostgreSQL
    published_at_ms: int = 0  # Redis TIME of the full publish of this version
    # The digest realm the version's SIP-device a1-hashes were made for ([fsxml] domain; "" = no
    # hashes): another configured realm needs a whole new snapshot (engine.sync.worker).
    sip_realm: str = ""

    @property
    def identity(self) -> tuple[int, str, str, str]:
        return (self.version, self.token, self.pg_snapshot, self.source)

    def to_redis(self) -> dict[str, str]:
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: Mapping[Any, Any]) -> SyncState | None:
        values = {_str(k): _str(v) for k, v in raw.items()}
        try:
            return cls(
                **{  # type: ignore[arg-type]  # each field gets its own type: int or str
                    f.name: int(values[f.name]) if f.type in ("int", int) else values[f.name]
                    for f in fields(cls)
                    if f.name in values
                }
            )
        except (KeyError, TypeError, ValueError):
            return None  # absent or unreadable: the worker publishes anew


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_state(client: Any, prefix: str) -> SyncState | None:
    """The sync state, or None if absent or unreadable; ``client`` may be a WATCHing pipeline."""
    raw = client.hgetall(sync_state_key(prefix))
    return SyncState.from_redis(raw) if raw else None


_READ_LUA = """
local state = redis.call('HGETALL', KEYS[1])
local current = redis.call('GET', KEYS[2])
local token = false
if current then token = redis.call('HGET', ARGV[1] .. current .. ':meta', 'token') end
return {state, current or false, token}
"""


def read_position(client: redis.Redis, prefix: str) -> tuple[SyncState | None, int | None, str | None]:
    """(sync state, current snapshot version, its token) in one round trip."""
    raw_state, current, token = client.register_script(_READ_LUA)(
        keys=[sync_state_key(prefix), pointer_key(prefix)], args=[snapshot_namespace(prefix)]
    )
    pairs = dict(zip(raw_state[0::2], raw_state[1::2], strict=True)) if raw_state else {}
    state = SyncState.from_redis(pairs) if pairs else None
    return state, (None if current is None else int(current)), (None if token is None else _str(token))


def _now_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def record_publish(
    client: redis.Redis,
    prefix: str,
    version: int,
    *,
    pg_snapshot: str,
    source: str,
    change_version: int,
    change_at_ms: int = 0,
    sip_realm: str = "",
) -> SyncState | None:
    """After ``publish_snapshot`` made ``version`` current: record what it reflects.

    Returns None (nothing written) if the pointer has moved on meanwhile.
    """
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(pointer_key(prefix), meta_key(prefix, version), sync_state_key(prefix))
        current = pipe.get(pointer_key(prefix))
        if current is None or int(current) != version:
            return None
        token, changes, published = pipe.hmget(
            meta_key(prefix, version), ["token", "changes", "published_at_ms"]
        )
        if token is None:
            return None
        now = _now_ms(pipe)
        state = SyncState(
            version=version,
            token=_str(token),
            pg_snapshot=pg_snapshot,
            source=source,
            changes=int(changes or 0),
            change_version=change_version,
            applied_at_ms=now,
            change_at_ms=change_at_ms,
            published_at_ms=int(published or now),
            sip_realm=sip_realm,
        )
        pipe.multi()
        pipe.delete(sync_state_key(prefix))
        pipe.hset(sync_state_key(prefix), mapping=state.to_redis())  # type: ignore[arg-type]
        try:
            pipe.execute()
        except redis.WatchError:
            return None
    return state


# One catch-up, atomically: the compare-and-set checks, the before-images, the writes, the state,
# the journal entry and the event. KEYS: state, pointer, meta, journal. ARGV[1]: a JSON spec
# (see apply_batch). Returns {1, changes, now_ms}, or {-1} state moved, {-2, pointer} not
# current, {-3} token changed, {-4, name} schema differs.
_APPLY_LUA = """
local spec = cjson.decode(ARGV[1])
local e = spec.expect
local st = redis.call('HMGET', KEYS[1], 'version', 'token', 'pg_snapshot', 'source')
if st[1] ~= e[1] or st[2] ~= e[2] or st[3] ~= e[3] or st[4] ~= e[4] then return {-1} end
local current = redis.call('GET', KEYS[2])
if current ~= e[1] then return {-2, current or ''} end
local meta = redis.call('HMGET', KEYS[3], 'token', 'changes')
if meta[1] ~= e[2] then return {-3} end
for name, fields in pairs(spec.schemas) do
  if redis.call('HGET', KEYS[3], 'schema:' .. name) ~= fields then return {-4, name} end
end
local function chunks(list, size, fn)
  for i = 1, #list, size do fn(unpack(list, i, math.min(i + size - 1, #list))) end
end
local before = {}
for name, keys in pairs(spec.before) do
  local images = {}
  chunks(keys, 1000, function(...)
    local asked = {...}
    local got = redis.call('HMGET', spec.hashes .. name, ...)
    for i = 1, #asked do images[asked[i]] = got[i] or cjson.null end
  end)
  before[name] = images
end
for name, flat in pairs(spec.sets) do
  chunks(flat, 2000, function(...) redis.call('HSET', spec.hashes .. name, ...) end)
end
for name, keys in pairs(spec.dels) do
  chunks(keys, 1000, function(...) redis.call('HDEL', spec.hashes .. name, ...) end)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changes = tonumber(meta[2] or '0')
if spec.changed then
  changes = changes + 1
  redis.call('HSET', KEYS[3], 'changes', changes)
end
local state = spec.state
state[#state + 1] = 'changes'
state[#state + 1] = tostring(changes)
state[#state + 1] = 'applied_at_ms'
state[#state + 1] = string.format('%d', now)
redis.call('HSET', KEYS[1], unpack(state))
if spec.changed then
  local event = spec.event
  event.changes = changes
  event.before = before
  event.sync.applied_at_ms = now
  local payload = cjson.encode(event)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', spec.maxlen, '*', 'payload', payload)
  redis.call('PUBLISH', spec.channel, payload)
end
return {1, changes, now}
"""


def apply_batch(
    client: redis.Redis,
    prefix: str,
    expected: SyncState,
    *,
    pg_snapshot: str,
    upserts: Iterable[Any] = (),
    deletes: Iterable[tuple[str, str]] = (),
    change_version: int = 0,
    change_at_ms: int = 0,
    journal_maxlen: int = 10_000,
) -> SyncState:
    """Apply one catch-up to the current snapshot version, atomically, if the state is ``expected``.

    ``upserts`` are entities (their state at ``pg_snapshot``), ``deletes`` (entity
    name, key) pairs of entities that no longer exist there. Without any, only the
    state moves on (no event). One Lua script, so one round trip: it checks that the
    state, the pointer and the version's token are still the expected ones and that
    the version was written with this code's field lists, reads the rates'
    before-images, writes, bumps the change count, moves the state, appends the
    journal and publishes. Returns the new state; raises StateMoved (re-read and
    recompute), SnapshotSuperseded or SchemaMismatch (engine.state.snapshot).
    """
    sets: dict[str, dict[str, str]] = {}
    for obj in upserts:
        sets.setdefault(entity_name(obj), {})[entity_key(obj)] = encode_entity(obj).decode()
    dels: dict[str, list[str]] = {}
    for name, key in deletes:
        if name not in ENTITY_TYPES:
            raise ValueError(f"unknown entity type {name!r}")
        if str(key) in sets.get(name, {}):
            raise ValueError(f"{name} {key!r} is both upserted and deleted")
        dels.setdefault(name, []).append(str(key))
    version = expected.version
    changed = bool(sets or dels)
    state = SyncState(
        version=version,
        token=expected.token,
        pg_snapshot=pg_snapshot,
        source=expected.source,
        change_version=max(change_version, expected.change_version),
        change_at_ms=max(change_at_ms, expected.change_at_ms),
        published_at_ms=expected.published_at_ms,
        sip_realm=expected.sip_realm,
    )
    fixed = {k: v for k, v in state.to_redis().items() if k not in ("changes", "applied_at_ms")}
    spec = {
        "expect": [str(version), expected.token, expected.pg_snapshot, expected.source],
        "schemas": {name: ",".join(schema(ENTITY_TYPES[name])) for name in sets},
        "hashes": entity_hash_key(prefix, version, ""),
        "sets": {name: [item for pair in mapping.items() for item in pair] for name, mapping in sets.items()},
        "dels": dels,
        "before": {
            name: [*sets.get(name, {}), *dels.get(name, [])]
            for name in BEFORE_IMAGE_ENTITIES
            if sets.get(name) or dels.get(name)
        },
        "changed": changed,
        "state": [item for pair in fixed.items() for item in pair],
        "event": {
            "type": "changes",
            "version": version,
            "token": expected.token,
            "upserts": {name: list(mapping) for name, mapping in sets.items()},
            "deletes": dels,
            "sync": {"change_version": change_version, "change_at_ms": change_at_ms},
        },
        "maxlen": journal_maxlen,
        "channel": snapshot_events_channel(prefix),
    }
    keys = [sync_state_key(prefix), pointer_key(prefix), meta_key(prefix, version), sync_journal_key(prefix)]
    reply = _apply_script(client)(keys=keys, args=[json.dumps(spec, separators=(",", ":"))])
    code = int(reply[0])
    if code == -1:
        raise StateMoved(f"sync state is no longer {expected.identity}")
    if code == -2:
        raise SnapshotSuperseded(f"version {version} is not current (current: {_str(reply[1]) or None})")
    if code == -3:
        raise StateMoved(f"snapshot {version} token changed")
    if code == -4:
        raise SchemaMismatch(f"{_str(reply[1])}: version {version} was written with other fields")
    return dataclasses.replace(state, changes=int(reply[1]), applied_at_ms=int(reply[2]))


def _apply_script(client: redis.Redis) -> Any:
    return client.register_script(_APPLY_LUA)


# --- leadership -----------------------------------------------------------------------------

# KEYS[1] lease; ARGV: worker id, lease ms. 1 = held by this worker (taken or renewed), 0 = not.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    """A Redis lease: one worker at a time applies changes (the others stand by).

    Only an efficiency measure: correctness comes from the compare-and-set on the sync
    state, so two workers that both believe they lead still never apply over each other.
    ``held`` is judged on the local monotonic clock: the lease counts as lost a third of
    its length before Redis would expire it, unless renewed.
    """

    def __init__(self, client: redis.Redis, prefix: str, worker_id: str, lease_seconds: float) -> None:
        self._client = client
        self._key = sync_leader_key(prefix)
        self.worker_id = worker_id
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._valid_until = 0.0
        self._acquire = client.register_script(_LEASE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    def renew(self) -> bool:
        """Take or renew the lease; True if this worker holds it. Redis errors propagate."""
        asked = time.monotonic()
        if int(self._acquire(keys=[self._key], args=[self.worker_id, self.lease_ms])) == 1:
            self._valid_until = asked + self.lease_ms / 1000 * 2 / 3
            return True
        self._valid_until = 0.0
        return False

    def release(self) -> None:
        self._valid_until = 0.0
        self._release(keys=[self._key], args=[self.worker_id])

    def holder(self) -> tuple[str | None, int]:
        """(worker id holding the lease, milliseconds left), (None, -2) if nobody holds it."""
        with self._client.pipeline(transaction=False) as pipe:
            pipe.get(self._key)
            pipe.pttl(self._key)
            holder, ttl = pipe.execute()
        return (None if holder is None else _str(holder)), int(ttl)
