"""Compact storage for the catalogue's large tables: one buffer of packed records per table.

At a million accounts, SIP devices and rates, one Python object per entity (plus its dict
slot, its key string, its ints) was ~1 GB per engine process (docs/performance.md, "Memory
and cold start"). Here each entity is one record in a single ``bytes`` buffer (its fields as
a ``marshal``-ed tuple: Decimals and datetimes as text, enums as their value), found through
sorted arrays, and built into its ``engine.model`` object on a hit, which costs a few
microseconds; a decision touches a handful of entities.

* :class:`PackedTable` maps a key (an int id, or a rate prefix) to an entity, like the dict it
  replaces (``get``, ``[]``, ``in``, ``pop``, assignment, iteration). Keys are in one sorted
  ``array`` (ints) or ``list`` (strings, shared between tables), records in one buffer with
  an offset array. Live changes go to an **overlay** (key -> new entity, or deleted) that
  every lookup consults first; a full snapshot switch builds a new table.
* A table may carry **secondary indexes** (accounts by number, devices by username): the
  a stable hash (CRC-32) of the field value per record, sorted, with the record positions; a lookup
  bisects the hash, decodes the few records found and compares the value.
  :class:`RankedView` serves "number -> the account that owns it" from it, choosing among
  the candidates at lookup time with the same rule ``Catalog.build`` used, so live changes
  need no re-derivation.
* :meth:`PackedTable.longest_match` finds the longest stored prefix of a number with one to
  three bisections (the predecessor of the number in sorted order is either that prefix or
  tells how much to shorten), instead of one lookup per prefix length.

Pure: no I/O, nothing of Redis or the codec (the rules layer imports only the model).
Every part of a table is a buffer (the records, and ``array``s of keys, offsets and index
hashes) or a list of strings, so a table pickles with its buffers out of band (protocol 5)
and loads back over a memory-mapped file without copying them (``engine.state.image``).
"""

from __future__ import annotations

import dataclasses
import enum
import marshal
import pickle
import types
import typing
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import accumulate
from operator import itemgetter
from typing import Any, Generic, TypeVar

K = TypeVar("K", int, str)
E = TypeVar("E")

_DELETED: Any = object()  # overlay value of a deleted key
_ABSENT: Any = object()
_SHARED_MAX = 100_000  # bound of the decoded-value caches (Decimals, datetimes)


class _Shared(dict[Any, Any]):
    """Equal immutable values decoded once and shared (bounded; cleared when full)."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, text: Any) -> Any:
        if len(self) >= _SHARED_MAX:
            self.clear()
        value = self[text] = self._make(text)
        return value


_DECIMALS = _Shared(Decimal)
_DATETIMES = _Shared(datetime.fromisoformat)


# --- records -------------------------------------------------------------------------------


def _field_kind(hint: Any) -> tuple[str, Any]:
    """('raw' | 'decimal' | 'datetime' | 'enum', enum class) for one field type."""
    args = typing.get_args(hint)
    if (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union) and type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
    if hint is Decimal:
        return "decimal", None
    if hint is datetime:
        return "datetime", None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "enum", hint
    return "raw", None  # int, str, bool, tuples of them: marshal keeps them as they are


class RecordCodec:
    """Entity <-> ``marshal``-ed tuple of its fields, for one frozen slotted dataclass.

    Both directions are generated once per class (as ``dataclasses`` generates
    ``__init__``), so a record costs one ``marshal`` call and one assignment per field.
    Decimals are stored as their exact text and datetimes in ISO form (both shared when
    decoded), enums as their value: an entity decodes equal to the one encoded.
    """

    def __init__(self, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        env: dict[str, Any] = {
            "_dumps": marshal.dumps,
            "_loads": marshal.loads,
            "_new": object.__new__,
            "_cls": cls,
            "_decimals": _DECIMALS,
            "_datetimes": _DATETIMES,
        }
        encode, decode = [], []
        for index, f in enumerate(fields):
            kind, enum_cls = _field_kind(hints[f.name])
            attr, item = f"o.{f.name}", f"v{index}"
            if kind == "decimal":
                enc, dec = f"(None if {attr} is None else str({attr}))", f"_decimals[{item}]"
            elif kind == "datetime":
                enc, dec = f"(None if {attr} is None else {attr}.isoformat())", f"_datetimes[{item}]"
            elif kind == "enum":
                env[f"_members_{index}"] = {member.value: member for member in enum_cls}
                env[f"_enum_{index}"] = enum_cls  # a raw value is accepted (validated) as the codec does
                # a member (the usual case) by one dict lookup rather than a call of the class
                env[f"_values_{index}"] = {member: member.value for member in enum_cls}
                enc = (
                    f"(None if {attr} is None else _values_{index}[{attr}] if {attr} in _values_{index}"
                    f" else _enum_{index}({attr}).value)"
                )
                dec = f"_members_{index}[{item}]"
            else:
                enc, dec = attr, item
            if kind != "raw":
                dec = f"(None if {item} is None else {dec})"
            encode.append(enc)
            env[f"_set_{index}"] = getattr(cls, f.name).__set__
            decode.append(f"    _set_{index}(o, {dec})\n")
        source = (
            f"def encode(o):\n    return _dumps(({', '.join(encode)},))\n"
            # unpacking the tuple into locals: cheaper than indexing it once per field
            f"def decode(b):\n    {''.join(f'v{i}, ' for i in range(len(fields)))}= _loads(b)\n"
            "    o = _new(_cls)\n" + "".join(decode) + "    return o\n"
        )
        exec(source, env)  # generated once per class, like dataclasses' __init__
        self.cls = cls
        self.encode: Callable[[Any], bytes] = env["encode"]
        self.decode: Callable[[bytes], Any] = env["decode"]


_CODECS: dict[type, RecordCodec] = {}


def record_codec(cls: type) -> RecordCodec:
    codec = _CODECS.get(cls)
    if codec is None:
        codec = _CODECS[cls] = RecordCodec(cls)
    return codec


# --- tables --------------------------------------------------------------------------------


def text_hash(value: str) -> int:
    """The hash a secondary index keeps: the same in every process (``hash()`` is not), so
    that a table can be written once and mapped by other processes (engine.state.image)."""
    return zlib.crc32(value.encode())


class _Index:
    """A secondary index: the :func:`text_hash` of a string field per record, sorted, with the
    record positions (``array``, or ``memoryview`` when mapped from an image file)."""

    __slots__ = ("getter", "hashes", "overlay", "positions")

    def __init__(self, getter: Callable[[Any], str], values: Iterable[str]) -> None:
        self.getter = getter
        crc32 = zlib.crc32  # text_hash, inlined: this runs once per record of the table
        by_position = [crc32(value.encode()) for value in values]
        # positions ordered by hash (stable: equal hashes in position order), cheaper than
        # sorting (hash, position) tuples
        order = sorted(range(len(by_position)), key=by_position.__getitem__)
        self.hashes: Sequence[int] = array("q", [by_position[p] for p in order])
        self.positions: Sequence[int] = array("q", order)
        self.overlay: dict[Any, set[Any]] = {}  # field value -> keys whose overlay entity has it

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_index, (self.getter, _buffer(self.hashes), _buffer(self.positions), self.overlay)


def _buffer(values: Sequence[int]) -> pickle.PickleBuffer:
    """An int array (or a mapped view of one) as a pickle buffer: out of band with protocol 5."""
    return pickle.PickleBuffer(values)  # type: ignore[arg-type]  # array and memoryview are buffers


def _int_view(data: Any) -> Sequence[int]:
    """The 64-bit ints of a buffer (bytes in band, a view of the mapped file out of band), not copied."""
    return memoryview(data).cast("B").cast("q")


def _rebuild_index(
    getter: Callable[[Any], str], hashes: Any, positions: Any, overlay: dict[Any, set[Any]]
) -> _Index:
    index = _Index.__new__(_Index)
    index.getter, index.hashes, index.positions = getter, _int_view(hashes), _int_view(positions)
    index.overlay = overlay
    return index


class PackedTable(MutableMapping[K, E], Generic[K, E]):
    """key -> entity over packed records, with an overlay for live changes (module docstring)."""

    __slots__ = (
        "_cache",
        "_cache_total",
        "_codec",
        "_indexes",
        "_keys",
        "_offsets",
        "_overlay",
        "_records",
        "_size",
    )

    def __init__(
        self,
        cls: type,
        items: Iterable[tuple[K, E]],
        int_keys: bool,
        indexes: Mapping[str, Callable[[E], Any]] | None = None,
    ) -> None:
        """``items``: (key, entity) pairs, each key once (the caller settles duplicates);
        ``indexes``: name -> the field getter of each secondary index."""
        codec = record_codec(cls)
        ordered = sorted(items, key=_FIRST)
        self._fill(
            codec,
            list(map(codec.encode, map(_SECOND, ordered))),
            [key for key, _ in ordered],
            int_keys,
            {
                name: (getter, [getter(entity) for _, entity in ordered])
                for name, getter in (indexes or {}).items()
            },
        )

    @classmethod
    def from_records(
        cls,
        entity_cls: type,
        records: Iterable[tuple[Any, ...]],
        key: str,
        int_keys: bool,
        indexes: Mapping[str, Callable[[E], Any]] | None = None,
    ) -> PackedTable[K, E]:
        """As the constructor, from record tuples: the entities' fields as :class:`RecordCodec`
        stores them (``engine.state.codec.decode_joined_records``), each packed as it comes
        (no entity built, no tuple kept). ``key``: the field the table is keyed by (the last
        record of a key wins, as a dict would keep it); each index is named after its field."""
        at = field_position(entity_cls, key)
        positions: list[int] = [field_position(entity_cls, name) for name in indexes or {}]
        record: tuple[Any, ...]
        dumps = marshal.dumps
        by_key: dict[Any, tuple[Any, ...]] = {}
        for record in records:  # encoded at once: (the record, its index values)
            by_key[record[at]] = (dumps(record), *map(record.__getitem__, positions))
        keys = sorted(by_key)
        rows = [by_key[k] for k in keys]
        del by_key
        table: PackedTable[K, E] = cls.__new__(cls)
        table._fill(
            record_codec(entity_cls),
            [row[0] for row in rows],
            keys,
            int_keys,
            {
                name: (getter, [row[n] for row in rows])
                for n, (name, getter) in enumerate((indexes or {}).items(), 1)
            },
        )
        return table

    @classmethod
    def from_encoded(
        cls, entity_cls: type, items: Iterable[tuple[K, bytes]], int_keys: bool
    ) -> PackedTable[K, E]:
        """As the constructor, from (key, record) pairs already encoded (``marshal``-ed record
        tuples), each key once; no secondary index."""
        ordered = sorted(items, key=_FIRST)
        table: PackedTable[K, E] = cls.__new__(cls)
        table._fill(
            record_codec(entity_cls), [chunk for _, chunk in ordered], [k for k, _ in ordered], int_keys, {}
        )
        return table

    def _fill(
        self,
        codec: RecordCodec,
        chunks: list[bytes],
        keys: list[Any],
        int_keys: bool,
        indexes: Mapping[str, tuple[Callable[[Any], Any], list[Any]]],
    ) -> None:
        """Set every slot from the records (encoded, in key order) and each index's values."""
        self._codec: RecordCodec = codec
        offsets = array("q", accumulate(map(len, chunks), initial=0))
        self._records: Any = b"".join(chunks)  # bytes, or a view of a mapped image file
        chunks.clear()
        self._offsets: Sequence[int] = offsets
        self._indexes: dict[str, _Index] = {
            name: _Index(getter, values) for name, (getter, values) in indexes.items()
        }
        self._keys: Any = array("q", keys) if int_keys else keys
        self._overlay: dict[K, Any] = {}
        self._size = len(keys)
        self._cache_total = 0  # see share_cache
        self._cache = _Recent(self._size)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with the records, offsets and int keys as buffers (out of band with protocol 5,
        so ``engine.state.image`` maps them from its file instead of copying them)."""
        keys = _buffer(self._keys) if not isinstance(self._keys, list) else self._keys
        records = pickle.PickleBuffer(self._records)
        return _rebuild_table, (
            self._codec.cls,
            records,
            _buffer(self._offsets),
            keys,
            self._indexes,
            self._overlay,
            self._size,
            self._cache_total,
        )

    # -- base records ------------------------------------------------------------------

    def _decode_at(self, position: int) -> E:
        key = self._keys[position]
        cache = self._cache
        entity: E | None = cache.young.get(key)
        if entity is None:
            entity = cache.old.get(key)
            if entity is None:
                offsets = self._offsets
                entity = self._codec.decode(self._records[offsets[position] : offsets[position + 1]])
            cache.add(key, entity)
        return entity

    def _position(self, key: K) -> int:
        keys = self._keys
        position = bisect_left(keys, key)
        if position < len(keys) and keys[position] == key:
            return position
        return -1

    def reset_cache(self) -> None:
        """Drop the recently built entities and size the cache anew (:func:`set_entity_cache`)."""
        self._cache = _Recent(self._size, self._cache_total)

    def share_cache(self, total: int) -> None:
        """Make this table one of a group of ``total`` records whose recent caches share one
        bound (:func:`recent_limit`), e.g. the rate tables of a catalogue; drops the cache."""
        self._cache_total = total
        self.reset_cache()

    def cached(self) -> int:
        """How many built entities the recent cache holds now (diagnostics, benchmarks)."""
        return len(self._cache)

    # -- mapping ---------------------------------------------------------------------------

    def get(self, key: K, default: Any = None) -> Any:
        overlay = self._overlay
        if overlay:
            held = overlay.get(key, _ABSENT)
            if held is not _ABSENT:
                return default if held is _DELETED else held
        # A base record read recently (not overlaid: see above). Inlined rather than through
        # _decode_at: this is the hottest lookup of a decision.
        cache = self._cache
        entity = cache.young.get(key)
        if entity is not None:
            return entity
        entity = cache.old.get(key)
        if entity is None:
            try:
                position = self._position(key)
            except TypeError:  # a key of another type (an int table asked for a str) is absent
                return default
            if position < 0:
                return default
            offsets = self._offsets
            entity = self._codec.decode(self._records[offsets[position] : offsets[position + 1]])
        cache.add(key, entity)
        return entity

    def __getitem__(self, key: K) -> E:
        entity = self.get(key, _ABSENT)
        if entity is _ABSENT:
            raise KeyError(key)
        result: E = entity
        return result

    def __contains__(self, key: object) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[K]:
        overlay = self._overlay
        for key in self._keys:
            if overlay.get(key, _ABSENT) is not _DELETED:
                yield key
        for key, held in list(overlay.items()):
            if held is not _DELETED and self._position(key) < 0:
                yield key

    def __repr__(self) -> str:
        return f"PackedTable({dict(self.items())!r})"

    # -- live changes: the overlay -----------------------------------------------------------

    def __setitem__(self, key: K, entity: E) -> None:
        old = self.get(key, _ABSENT)
        self._unindex(key)
        self._overlay[key] = entity
        for index in self._indexes.values():
            index.overlay.setdefault(index.getter(entity), set()).add(key)
        if old is _ABSENT:
            self._size += 1

    def __delitem__(self, key: K) -> None:
        if self.get(key, _ABSENT) is _ABSENT:
            raise KeyError(key)
        self._unindex(key)
        if self._position(key) >= 0:
            self._overlay[key] = _DELETED
        else:
            del self._overlay[key]
        self._size -= 1

    def pop(self, key: K, default: Any = _ABSENT) -> Any:
        entity = self.get(key, _ABSENT)
        if entity is _ABSENT:
            if default is _ABSENT:
                raise KeyError(key)
            return default
        del self[key]
        return entity

    def _unindex(self, key: K) -> None:
        held = self._overlay.get(key, _ABSENT)
        if held is _ABSENT or held is _DELETED:
            return
        for index in self._indexes.values():
            value = index.getter(held)
            keys = index.overlay.get(value)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index.overlay[value]

    # -- secondary lookups -----------------------------------------------------------------

    def having(self, name: str, value: Any) -> list[E]:
        """Every entity whose indexed field ``name`` equals ``value`` (overlay included)."""
        index = self._indexes[name]
        getter, overlay, found = index.getter, self._overlay, []
        hashes, positions = index.hashes, index.positions
        wanted = text_hash(value)
        at = bisect_left(hashes, wanted)
        while at < len(hashes) and hashes[at] == wanted:
            position = positions[at]
            at += 1
            if overlay and self._keys[position] in overlay:
                continue  # changed or deleted: the overlay has it
            entity = self._decode_at(position)
            if getter(entity) == value:
                found.append(entity)
        for key in index.overlay.get(value, ()):
            found.append(overlay[key])
        return found

    def values_of(self, name: str) -> set[Any]:
        """Every distinct value of the indexed field ``name`` (tests, diagnostics: walks all)."""
        getter = self._indexes[name].getter
        return {getter(self[key]) for key in self}

    # -- longest prefix ----------------------------------------------------------------------

    def longest_match(self, number: str, longest: int) -> E | None:
        """The entity of the longest key that starts ``number`` (at most ``longest`` long).

        For string keys. The base keys are sorted: the greatest key <= ``s`` is either a
        prefix of ``s`` (then the longest one: a longer prefix would sort between it and
        ``s``) or shares some first characters with it, and no prefix of ``s`` is longer
        than those shared characters; so ``s`` is cut to them and searched again. The
        overlay's keys are tried at each length above the base's answer.
        """
        keys, overlay = self._keys, self._overlay
        s = number[:longest]
        above = len(s)  # overlay keys of this length and shorter are still to be tried
        while True:
            at = bisect_right(keys, s) - 1
            while at >= 0 and not s.startswith(keys[at]):
                shared = 0
                for a, b in zip(keys[at], s, strict=False):
                    if a != b:
                        break
                    shared += 1
                s = s[:shared]
                at = bisect_right(keys, s) - 1
            floor = len(keys[at]) if at >= 0 else -1
            if overlay:
                for n in range(above, floor, -1):
                    held = overlay.get(number[:n], _ABSENT)  # type: ignore[call-overload]
                    if held is not _ABSENT and held is not _DELETED:
                        result: E = held
                        return result
            if at < 0:
                return None
            held = overlay.get(keys[at], _ABSENT) if overlay else _ABSENT
            if held is _ABSENT:
                return self._decode_at(at)
            if held is not _DELETED:
                return held  # type: ignore[no-any-return]
            if floor == 0:
                return None
            s = number[: floor - 1]  # that prefix was deleted: the next shorter one
            above = floor - 1


def _rebuild_table(
    cls: type,
    records: Any,
    offsets: Any,
    keys: Any,
    indexes: dict[str, _Index],
    overlay: dict[Any, Any],
    size: int,
    cache_total: int,
) -> PackedTable[Any, Any]:
    table: PackedTable[Any, Any] = PackedTable.__new__(PackedTable)
    table._codec = record_codec(cls)
    table._records = records  # bytes, or a read-only view of the mapped file
    table._offsets = _int_view(offsets)
    table._keys = keys if isinstance(keys, list) else _int_view(keys)
    table._indexes, table._overlay, table._size = indexes, overlay, size
    table._cache_total = cache_total
    table._cache = _Recent(size, cache_total)
    return table


# Bound of each table's recent-entity cache (:class:`_Recent`), entities per generation; set
# from ``engine.entity_cache`` by the engine before it loads (docs/performance.md, "Decision
# cost": the measured trade of memory against decision CPU).
ENTITY_CACHE_DEFAULT = 16_384
_entity_cache_max = ENTITY_CACHE_DEFAULT
_ENTITY_CACHE_FLOOR = 1024  # small tables: at least this many (a handful of KB, no misses)
_SHARED_FLOOR = 256  # a table of a group sharing one bound (recent_limit): at least this many


def recent_limit(size: int, maximum: int, total: int = 0) -> int:
    """Entities per generation of the recent cache of a table of ``size`` records.

    Alone (``total`` 0): a quarter of the table (two generations then hold up to half of
    it: the callers of an hour are a fraction of the accounts), at least 1,024 so that a
    small table is never rebuilt, and at most ``maximum``, the memory bound: a full cache
    of a table holds at most ``2 * limit`` entities (~0.3 KB each, docs/performance.md).
    ``maximum`` below the floor wins (0 is not allowed: see ``engine.config``).

    One of a group of tables of ``total`` records together (the rate tables of a catalogue:
    at 1M rates, 100 rate groups of 10,000 each held up to 5,000 cached rates *each*): the
    group shares ``maximum``, each table its part by size, at least ``_SHARED_FLOOR`` (the
    popular prefixes of a small table), never more than alone."""
    alone = min(maximum, max(_ENTITY_CACHE_FLOOR, size // 4))
    if total <= 0:
        return alone
    return min(alone, max(_SHARED_FLOOR, maximum * size // total))


def set_entity_cache(maximum: int) -> None:
    """The bound of the recent caches of tables built or mapped from now on."""
    global _entity_cache_max
    if maximum < 1:
        raise ValueError(f"entity cache bound must be >= 1, not {maximum}")
    _entity_cache_max = maximum


def entity_cache() -> int:
    return _entity_cache_max


class _Recent:
    """The recently decoded base records of a table (key -> entity), two generations.

    A decision reads some records again and again (the providers of the trunks, the
    termination rates of popular prefixes, a busy account). The records are immutable
    (changes go to the overlay, looked up first), so a cached entity never goes stale.
    Bounded: when ``young`` is full it becomes ``old`` and the previous ``old`` is dropped;
    a hit in ``old`` moves back to ``young``, so what is read often stays (an approximate
    LRU at the cost of a dict lookup or two). ``limit`` entities per generation
    (:func:`recent_limit`).
    """

    __slots__ = ("limit", "old", "young")

    def __init__(self, size: int, total: int = 0) -> None:
        self.limit = recent_limit(size, _entity_cache_max, total)
        self.young: dict[Any, Any] = {}
        self.old: dict[Any, Any] = {}

    def add(self, key: Any, entity: Any) -> None:
        if len(self.young) >= self.limit:
            self.old, self.young = self.young, {}
        self.young[key] = entity

    def __len__(self) -> int:
        return len(self.young) + len(self.old)


_FIRST, _SECOND = itemgetter(0), itemgetter(1)


class RankedView(Mapping[Any, E], Generic[E]):
    """value -> the entity that owns it among those of a table's secondary index.

    ``choose`` picks among the candidates (all entities with that value) exactly as
    ``Catalog.build`` did when it kept one per value; it runs at lookup time over the
    (almost always one) candidate, so a live change of the table needs nothing here.
    """

    __slots__ = ("_choose", "_index", "_table")

    def __init__(self, table: PackedTable[Any, E], index: str, choose: Callable[[list[E]], E | None]) -> None:
        self._table, self._index, self._choose = table, index, choose

    def get(self, value: Any, default: Any = None) -> Any:
        candidates = self._table.having(self._index, value)
        if not candidates:
            return default
        chosen = self._choose(candidates)
        return default if chosen is None else chosen

    def __getitem__(self, value: Any) -> E:
        entity = self.get(value, _ABSENT)
        if entity is _ABSENT:
            raise KeyError(value)
        result: E = entity
        return result

    def __contains__(self, value: object) -> bool:
        return self.get(value, _ABSENT) is not _ABSENT

    def __iter__(self) -> Iterator[Any]:
        return iter(sorted(v for v in self._table.values_of(self._index) if v in self))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"RankedView({dict(self.items())!r})"


def packed_by_id(
    cls: type, entities: Iterable[Any], indexes: Mapping[str, Callable[[Any], Any]] | None = None
) -> PackedTable[int, Any]:
    """A table of entities by their ``id`` (the last of one id wins, as a dict would keep it)."""
    by_id = {entity.id: entity for entity in entities}
    return PackedTable(cls, by_id.items(), int_keys=True, indexes=indexes)


def packed_rates(cls: type, table: Mapping[str, Any]) -> PackedTable[str, Any]:
    """A prefix -> rate table (its prefixes already unique, the winner of each chosen)."""
    return PackedTable(cls, table.items(), int_keys=False)


def packed_records_by_id(
    cls: type, records: Iterable[tuple[Any, ...]], indexes: Mapping[str, Callable[[Any], Any]] | None = None
) -> PackedTable[int, Any]:
    """:func:`packed_by_id` from record tuples (:meth:`PackedTable.from_records`)."""
    return PackedTable.from_records(cls, records, "id", int_keys=True, indexes=indexes)


def field_position(cls: type, name: str) -> int:
    """Where field ``name`` of ``cls`` is in its record tuple."""
    return [f.name for f in dataclasses.fields(cls)].index(name)


def entity_of(cls: type, record: bytes) -> Any:
    """The entity of an encoded record (for the few built singly, e.g. a small rate table)."""
    return record_codec(cls).decode(record)
