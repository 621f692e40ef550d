"""Compact JSON codec for the entities of :mod:`engine.model`.

One entity is encoded as a JSON array of its field values in dataclass field
order (the *schema*, :func:`schema`), e.g. a termination rate::

    [123456,3,"441234","0.0093","0",0,1,1,"","",0,true]

- ``Decimal`` -> string (``str(d)``: exact, keeps the exponent, "1.10" stays "1.10");
- ``datetime`` -> ISO-8601 in UTC (``2025-01-31T23:59:59+00:00``); naive datetimes are
  rejected (``CodecError``) rather than guessed, aware ones are converted to UTC;
- enums -> their value; tuples -> lists; ``None`` -> ``null``.

Arrays rather than objects because the snapshot holds a million rates: a rate is
~50 bytes instead of ~190 and decodes ~30 % faster. The price is that the position
of a field is the schema, so the snapshot records every entity's schema (its field
names, :func:`schema`) in its meta hash, and a reader whose model differs decodes
with the stored field names (``stored_fields`` of :func:`decode_entity`): fields the writer did not
know take their dataclass default, fields the reader does not know are ignored.

Per class, encoder and decoder are generated once (like ``dataclasses`` generates
``__init__``) so a row costs one ``json.loads`` plus one constructor call, with no
per-field introspection.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import marshal
import types
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from engine.model import ENTITY_TYPES
from engine.rules.packed import record_codec

__all__ = [
    "CodecError",
    "decode_entity",
    "decode_joined",
    "decode_joined_records",
    "decode_many",
    "encode_entity",
    "schema",
]

Encoder = Callable[[Any], bytes]
RowBuilder = Callable[[list[Any]], Any]

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False, allow_nan=False)
_IDENTITY_TYPES = (int, str, bool)


class CodecError(ValueError):
    """An entity could not be encoded or decoded."""


def encode_entity(obj: Any) -> bytes:
    """Encode one entity of engine.model as compact JSON bytes."""
    try:
        encoder = _ENCODERS[type(obj)]
    except KeyError:
        raise CodecError(f"not an entity type of engine.model: {type(obj).__name__}") from None
    try:
        return encoder(obj)
    except CodecError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        raise CodecError(f"cannot encode {obj!r}: {exc}") from exc


def decode_entity(cls: type, data: bytes, stored_fields: tuple[str, ...] | None = None) -> Any:
    """Decode bytes written by :func:`encode_entity` for ``cls``.

    ``stored_fields`` is the writer's :func:`schema` when it may differ from the current one.
    """
    build = _row_builder(cls, stored_fields)
    try:
        return build(json.loads(data))
    except _DECODE_ERRORS as exc:
        raise CodecError(f"cannot decode {cls.__name__} from {bytes(data)[:200]!r}: {exc}") from exc


def decode_many(
    cls: type, values: Sequence[bytes], stored_fields: tuple[str, ...] | None = None
) -> list[Any]:
    """Decode many encoded ``cls`` entities at once (one ``json.loads`` for the whole batch)."""
    build = _row_builder(cls, stored_fields)
    try:
        if values and isinstance(values[0], str):  # a client with decode_responses=True
            rows = json.loads("[" + ",".join(values) + "]")
        else:
            rows = json.loads(b"[" + b",".join(values) + b"]")
        if len(rows) == len(values):
            return [build(row) for row in rows]
    except _DECODE_ERRORS:
        pass
    return [decode_entity(cls, value, stored_fields) for value in values]  # pinpoints the bad row


def decode_joined(
    cls: type, joined: bytes, count: int, stored_fields: tuple[str, ...] | None = None
) -> list[Any]:
    """Decode ``count`` encoded ``cls`` entities stored as one comma-joined blob.

    The snapshot reader keeps each page of rows this way (one allocation instead of one
    bytes object per row; see ``engine.state.snapshot``). A bad row is pinpointed by
    reading the rows one by one.
    """
    built = _all_rows(joined, count, _row_builder(cls, stored_fields))
    if built is not None:
        return built
    return [decode_entity(cls, row, stored_fields) for row in _split_rows(joined)]


def _all_rows(joined: bytes, count: int, build: Callable[[Any], Any]) -> list[Any] | None:
    """``build`` of each of the ``count`` rows of ``joined``, parsed in one ``json.loads``; None
    when parsing or a build fails, or the count differs: the caller then reads the rows one
    by one, which pinpoints the bad row in its error."""
    try:
        rows = json.loads(b"[" + joined + b"]")
        if len(rows) == count:
            return [build(row) for row in rows]
    except _DECODE_ERRORS:
        pass
    return None


def decode_joined_records(
    cls: type, joined: bytes, count: int, stored_fields: tuple[str, ...] | None = None
) -> list[tuple[Any, ...]]:
    """As :func:`decode_joined`, but each row as its packed record's tuple, not an entity.

    The tuple is what ``engine.rules.packed.RecordCodec`` makes of the entity the row
    decodes to (its fields in dataclass order; Decimals and datetimes as their canonical
    text, enums as their value, lists as tuples, absent fields as their default), without
    building the entity: a full load packs a million rows straight from the JSON
    (docs/performance.md, "Memory and cold start"). A bad row raises the same
    ``CodecError`` as :func:`decode_joined`.
    """
    records = _all_rows(joined, count, _record_builder(cls, stored_fields))
    if records is not None:
        return records
    entities = [decode_entity(cls, row, stored_fields) for row in _split_rows(joined)]
    return [_record_of(entity) for entity in entities]  # all decoded after all (count was off)


def _record_of(entity: Any) -> tuple[Any, ...]:
    values: tuple[Any, ...] = marshal.loads(record_codec(type(entity)).encode(entity))
    return values


def _split_rows(joined: bytes) -> list[bytes]:
    """The rows of a comma-joined blob, each as its own bytes (for error reports)."""
    text = joined.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    rows: list[bytes] = []
    position = 0
    while position < len(text):
        try:
            _, end = decoder.raw_decode(text, position)
        except ValueError:  # the rest is not JSON: hand it over whole, decode_entity says why
            rows.append(text[position:].encode())
            break
        rows.append(text[position:end].encode())
        position = end + 1  # the comma
    return rows


def schema(cls: type) -> tuple[str, ...]:
    """The field names of ``cls`` in encoding order."""
    return _schema(cls)


@functools.cache
def _schema(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _row_builder(cls: type, stored_fields: tuple[str, ...] | None) -> RowBuilder:
    return _build_decoder(cls, _schema(cls) if stored_fields is None else tuple(stored_fields))


_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, ArithmeticError)
_DECIMAL_CACHE_MAX = 100_000


class _DecimalCache(dict[Any, Decimal]):
    """Shares equal ``Decimal`` objects between decoded rows (immutable, so safe).

    A million rates hold a few thousand distinct amounts: sharing them saves ~200 bytes
    per rate and the ``Decimal()`` parse on a hit. Cleared when it grows past a bound.
    """

    __slots__ = ()

    def __missing__(self, text: Any) -> Decimal:
        if len(self) >= _DECIMAL_CACHE_MAX:
            self.clear()
        value = self[text] = Decimal(text)
        return value


_DECIMALS = _DecimalCache()


class _SharedValues(dict[Any, Any]):
    """Shares equal immutable values (strings, datetimes) between decoded rows.

    ``json.loads`` makes a new object for every string it reads: a million SIP devices
    would hold a million copies of ``"default"`` (~56 bytes each), a million accounts a
    million equal ``first_used`` datetimes (48 bytes each). Sharing them is what string
    interning does, without making the strings immortal; bounded like the Decimal cache.
    """

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, text: Any) -> Any:
        if len(self) >= _DECIMAL_CACHE_MAX:
            self.clear()
        value = self[text] = self._make(text)
        return value


_STRINGS = _SharedValues(lambda text: text)  # the first copy read is the one shared
_DATETIMES = _SharedValues(datetime.fromisoformat)
_INTS = _SharedValues(lambda number: number)
# References to entities there are few of, repeated by many rows (a million rates name a
# hundred rate groups): each row would otherwise hold its own int object (32 bytes).
_SHARED_INT_FIELDS = frozenset(
    {
        "rate_group_id",
        "non_cli_rate_group_id",
        "reseller_id",
        "trunk_id",
        "gateway_id",
        "provider_id",
        "localization_id",
    }
)


# --- per-field conversions, chosen once per class from the type hints ------------------------


def _enc_decimal(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _enc_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.utcoffset() is None:
        raise CodecError(f"naive datetime {value!r}: the snapshot stores UTC, pass an aware datetime")
    return value.astimezone(UTC).isoformat()


def _enum_encoder(cls: type[enum.Enum]) -> Callable[[Any], Any]:
    """``E(x).value``: accepts a member or a raw value (validated), ``None`` passes."""

    def encode(value: Any) -> Any:
        return None if value is None else cls(value).value

    return encode


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``; other unions are not supported."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"unsupported union type {hint!r}")
        return args[0], True
    return hint, False


def _tuple_item_type(hint: Any) -> Any | None:
    """The item type of ``tuple[X, ...]``, else None."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        raise TypeError(f"only homogeneous tuples (tuple[X, ...]) are supported, not {hint!r}")
    return None


def _field_code(
    hint: Any, attr: str, item: str, env: dict[str, Any], tag: str, name: str = ""
) -> tuple[str, str]:
    """(encode expression over ``attr``, decode expression over ``item``) for field ``name``.

    ``env`` receives the helper objects the expressions refer to; ``tag`` makes names unique.
    """
    inner, optional = _unwrap_optional(hint)
    if inner is str:
        env["_strings"] = _STRINGS
        return attr, _or_none(f"_strings[{item}]", item, optional)
    if inner is int and name in _SHARED_INT_FIELDS:
        env["_ints"] = _INTS
        return attr, _or_none(f"_ints[{item}]", item, optional)
    if inner in _IDENTITY_TYPES:
        return attr, item
    if inner is Decimal:
        env["_decimals"], env["_enc_decimal"] = _DECIMALS, _enc_decimal
        dec = f"_decimals[{item}]"
        return (f"_enc_decimal({attr})" if optional else f"str({attr})"), _or_none(dec, item, optional)
    if inner is datetime:
        env["_datetimes"], env["_enc_datetime"] = _DATETIMES, _enc_datetime
        return f"_enc_datetime({attr})", _or_none(f"_datetimes[{item}]", item, optional)
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        env[f"_members_{tag}"] = {member.value: member for member in inner}
        env[f"_enc_enum_{tag}"] = _enum_encoder(inner)
        return f"_enc_enum_{tag}({attr})", _or_none(f"_members_{tag}[{item}]", item, optional)
    item_type = _tuple_item_type(inner)
    if item_type in _IDENTITY_TYPES:
        env["_tuple"] = tuple
        return attr, _or_none(f"_tuple({item})", item, optional)
    if item_type is Decimal:
        env["_decimals"], env["_tuple"] = _DECIMALS, tuple
        enc = f"[str(x) for x in {attr}]"
        dec = f"_tuple([_decimals[x] for x in {item}])"
        return (f"(None if {attr} is None else {enc})" if optional else enc), _or_none(dec, item, optional)
    raise TypeError(f"no codec for field type {hint!r}")


def _or_none(expr: str, item: str, optional: bool) -> str:
    return f"(None if {item} is None else {expr})" if optional else expr


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_encoder(cls: type) -> Encoder:
    hints = _hints(cls)
    env: dict[str, Any] = {"_dumps": _JSON.encode}
    parts = []
    for index, f in enumerate(dataclasses.fields(cls)):
        enc, _ = _field_code(hints[f.name], f"o.{f.name}", "", env, str(index))
        parts.append(enc)
    source = f"def encode(o):\n    return _dumps([{', '.join(parts)}]).encode()\n"
    exec(source, env)  # generated once per class, like dataclasses' __init__
    encode: Callable[[Any], bytes] = env["encode"]
    return encode


def _build_decoder(cls: type, stored: tuple[str, ...]) -> RowBuilder:
    """Generate ``build(values: list) -> cls`` for rows written with the ``stored`` schema.

    Frozen slotted dataclasses without ``__post_init__`` are filled slot by slot
    (``object.__new__`` + the slot descriptors), which is ~40 % cheaper than their
    generated ``__init__`` (one ``object.__setattr__`` call per field); any other
    class goes through its constructor.
    """
    hints = _hints(cls)
    position = {name: index for index, name in enumerate(stored)}
    direct = "__slots__" in cls.__dict__ and not hasattr(cls, "__post_init__")
    env: dict[str, Any] = {"_cls": cls, "_new": object.__new__}
    lines = [f"def build(v):\n    if len(v) != {len(stored)}:\n        raise _Mismatch(len(v))\n"]
    lines.append("    o = _new(_cls)\n" if direct else "    return _cls(\n")
    for index, f in enumerate(dataclasses.fields(cls)):
        if f.name in position:
            _, value = _field_code(hints[f.name], "", f"v[{position[f.name]}]", env, str(index), f.name)
        elif f.default is not dataclasses.MISSING:  # not written by an older writer: the default applies
            env[f"_default_{index}"], value = f.default, f"_default_{index}"
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_factory_{index}"], value = f.default_factory, f"_factory_{index}()"
        else:
            raise CodecError(f"stored schema of {cls.__name__} lacks required field {f.name!r}")
        if direct:
            env[f"_set_{index}"] = getattr(cls, f.name).__set__
            lines.append(f"    _set_{index}(o, {value})\n")
        else:
            lines.append(f"        {f.name}={value},\n")
    lines.append("    return o\n" if direct else "    )\n")
    env["_Mismatch"] = functools.partial(_mismatch, cls, len(stored))
    exec("".join(lines), env)  # generated once per class and stored schema
    build: Callable[[list[Any]], Any] = env["build"]
    return build


_DECIMAL_TEXTS = _SharedValues(lambda value: str(Decimal(value)))  # as the record stores a Decimal
_DATETIME_TEXTS = _SharedValues(lambda text: datetime.fromisoformat(text).isoformat())


@functools.cache
def _record_builder(
    cls: type, stored_fields: tuple[str, ...] | None
) -> Callable[[list[Any]], tuple[Any, ...]]:
    """Generate ``record(values: list) -> tuple`` (see :func:`decode_joined_records`), once per
    class and stored schema, with the conversions the entity path makes (``_build_decoder``)
    followed by those of the record codec (``engine.rules.packed.RecordCodec``)."""
    stored = _schema(cls) if stored_fields is None else tuple(stored_fields)
    hints = _hints(cls)
    position = {name: index for index, name in enumerate(stored)}
    env: dict[str, Any] = {
        "_tuple": tuple,
        "_decimal_texts": _DECIMAL_TEXTS,
        "_datetime_texts": _DATETIME_TEXTS,
        "_Mismatch": functools.partial(_mismatch, cls, len(stored)),
    }
    parts = []
    for index, f in enumerate(dataclasses.fields(cls)):
        inner, optional = _unwrap_optional(hints[f.name])
        if f.name not in position:  # not written by an older writer: the default, as a record holds it
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise CodecError(f"stored schema of {cls.__name__} lacks required field {f.name!r}")
            env[f"_default_{index}"] = _record_value(inner, default)
            parts.append(f"_default_{index}")
            continue
        item = f"v[{position[f.name]}]"
        if inner is Decimal:
            value = f"_decimal_texts[{item}]"
        elif inner is datetime:
            value = f"_datetime_texts[{item}]"
        elif isinstance(inner, type) and issubclass(inner, enum.Enum):
            env[f"_values_{index}"] = {member.value: member.value for member in inner}
            value = f"_values_{index}[{item}]"
        elif (item_type := _tuple_item_type(inner)) is not None:
            value = (
                f"_tuple([_decimal_texts[x] for x in {item}])" if item_type is Decimal else f"_tuple({item})"
            )
        elif inner is str:  # shared as the entity path shares them (a million "default"s otherwise)
            env["_strings"] = _STRINGS
            value = f"_strings[{item}]"
        elif inner is int and f.name in _SHARED_INT_FIELDS:
            env["_ints"] = _INTS
            value = f"_ints[{item}]"
        else:
            value = item
        parts.append(_or_none(value, item, optional) if value != item else item)
    source = (
        f"def record(v):\n    if len(v) != {len(stored)}:\n        raise _Mismatch(len(v))\n"
        f"    return ({', '.join(parts)},)\n"
    )
    exec(source, env)  # generated once per class and stored schema
    record: Callable[[list[Any]], tuple[Any, ...]] = env["record"]
    return record


def _record_value(hint: Any, value: Any) -> Any:
    """A default value as a record holds it."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return tuple(str(x) if isinstance(x, Decimal) else x for x in value)
    return value


def _mismatch(cls: type, expected: int, got: int) -> ValueError:
    return ValueError(f"{cls.__name__}: expected {expected} values, got {got}")


_ENCODERS: dict[type, Encoder] = {cls: _build_encoder(cls) for cls in ENTITY_TYPES.values()}
for _cls in ENTITY_TYPES.values():  # fail at import, not mid-snapshot, if a model field type has no codec
    _row_builder(_cls, None)
del _cls
