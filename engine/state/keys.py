"""Every Redis key and channel name callgate uses, in one place.

All names start with the deployment's configured prefix ``P`` (``redis.key_prefix``,
e.g. ``callgate:``), so several deployments (and the tests' private prefixes) share
one Redis. The modules that read and write these keys document what they hold:

========================  ========  =====================================================
name                      type      owner (what it holds)
========================  ========  =====================================================
P snapshot:current        string    engine.state.snapshot: the current version
P snapshot:next_version   string    engine.state.snapshot: INCR counter of versions
P snapshot:versions       zset      engine.state.snapshot: versions that may own keys
P snapshot:events         pub/sub   engine.state.snapshot: snapshot and change events
P snapshot:{v}:{entity}   hash      engine.state.snapshot: one entity type of version v
P snapshot:{v}:meta       hash      engine.state.snapshot: marks version v complete
P snapshot:{v}:writer     string    engine.state.snapshot: publisher's lease on version v
P snapshot:{v}:image      hash      engine.state.imageblob: version v's catalogue images,
                                    per code fingerprint fp: field fp (manifest, JSON)
                                    and fields fp:{nonce}:{n} (chunk n of the image),
                                    building:{fp} (the producer's "being built" mark)
P sync:state              hash      engine.sync.state: what the snapshot reflects
P sync:leader             string    engine.sync.state: the leader lease
P sync:journal            stream    engine.sync.state: change events, for gap filling
P events                  stream    engine.state.events: engine -> PostgreSQL events
P limits:calls            zset      engine.state.limits: every counted call -> deadline
P limits:call:{uuid}      hash      engine.state.limits: what one call holds
P limits:ch:{group}:{id}  zset      engine.state.limits: live calls of a subject
P limits:cps:{group}:{id} zset      engine.state.limits: admissions of a subject (CPS log)
P funds:acct:{id}         hash      engine.state.funds: spent, reserved of an account
P funds:res:{id}          zset      engine.state.funds: open reservations -> deadline
P funds:amt:{id}          hash      engine.state.funds: what each open call reserved
P funds:call:{uuid}       hash      engine.state.funds: granted seconds, settled flag
P cdrs                    stream    engine.state.funds -> engine.sync.cdrs: the CDRs
========================  ========  =====================================================

Pure functions of strings; nothing here talks to Redis.
"""

from __future__ import annotations

__all__ = [
    "SNAPSHOT_NAMESPACE",
    "cdr_stream",
    "entity_hash_key",
    "events_stream",
    "funds_account_key",
    "funds_account_pattern",
    "funds_amounts_key",
    "funds_call_key",
    "funds_reservations_key",
    "image_blob_key",
    "limits_call_key",
    "limits_channels_key",
    "limits_cps_key",
    "limits_registry_key",
    "meta_key",
    "next_version_key",
    "pointer_key",
    "snapshot_events_channel",
    "snapshot_namespace",
    "sync_journal_key",
    "sync_leader_key",
    "sync_state_key",
    "versions_key",
    "writer_key",
]

SNAPSHOT_NAMESPACE = "snapshot:"

# --- the snapshot (engine.state.snapshot) -----------------------------------------------------


def snapshot_namespace(prefix: str) -> str:
    """The common start of every snapshot key (a Lua script rebuilds hash names from it)."""
    return f"{prefix}{SNAPSHOT_NAMESPACE}"


def pointer_key(prefix: str) -> str:
    return f"{prefix}snapshot:current"


def next_version_key(prefix: str) -> str:
    return f"{prefix}snapshot:next_version"


def versions_key(prefix: str) -> str:
    return f"{prefix}snapshot:versions"


def snapshot_events_channel(prefix: str) -> str:
    """The pub/sub channel of snapshot and change events."""
    return f"{prefix}snapshot:events"


def entity_hash_key(prefix: str, version: int | str, name: str) -> str:
    return f"{prefix}snapshot:{version}:{name}"


def meta_key(prefix: str, version: int) -> str:
    return f"{prefix}snapshot:{version}:meta"


def writer_key(prefix: str, version: int) -> str:
    return f"{prefix}snapshot:{version}:writer"


def image_blob_key(prefix: str, version: int | str) -> str:
    """hash: the published catalogue images of version ``version`` (engine.state.imageblob);
    deleted with the version."""
    return f"{prefix}snapshot:{version}:image"


# --- the sync worker (engine.sync.state) ------------------------------------------------------


def sync_state_key(prefix: str) -> str:
    return f"{prefix}sync:state"


def sync_leader_key(prefix: str) -> str:
    return f"{prefix}sync:leader"


def sync_journal_key(prefix: str) -> str:
    return f"{prefix}sync:journal"


# --- engine events (engine.state.events, engine.sync.persist) ---------------------------------


def events_stream(prefix: str) -> str:
    return f"{prefix}events"


# --- shared limits (engine.state.limits) ------------------------------------------------------


def limits_registry_key(prefix: str) -> str:
    return f"{prefix}limits:calls"


def limits_call_key(prefix: str, call_uuid: str) -> str:
    return f"{prefix}limits:call:{call_uuid}"


def limits_channels_key(prefix: str, group: str, subject_id: int) -> str:
    """``group`` is the subject's counter group: ``acct``, ``did`` or ``trunk``."""
    return f"{prefix}limits:ch:{group}:{subject_id}"


def limits_cps_key(prefix: str, group: str, subject_id: int) -> str:
    return f"{prefix}limits:cps:{group}:{subject_id}"


# --- funds reservations and the CDR stream (engine.state.funds, engine.billing) ---------------


def funds_account_key(prefix: str, account_id: int) -> str:
    """hash: spent, reserved (micro-units) of one account."""
    return f"{prefix}funds:acct:{account_id}"


def funds_account_pattern(prefix: str) -> str:
    """SCAN pattern of every account's funds hash (the metrics' totals)."""
    return f"{prefix}funds:acct:*"


def funds_reservations_key(prefix: str, account_id: int) -> str:
    """zset: open reservations of one account, call uuid -> deadline (ms)."""
    return f"{prefix}funds:res:{account_id}"


def funds_amounts_key(prefix: str, account_id: int) -> str:
    """hash: call uuid -> micro-units it reserved on this account."""
    return f"{prefix}funds:amt:{account_id}"


def funds_call_key(prefix: str, call_uuid: str) -> str:
    """hash: d (granted seconds), st ('1' once settled): a call's idempotency record."""
    return f"{prefix}funds:call:{call_uuid}"


def cdr_stream(prefix: str) -> str:
    """stream: one entry per settled call, its CDR for PostgreSQL (engine.sync.cdrs)."""
    return f"{prefix}cdrs"
