"""Account numbers, PINs and generated passwords, and hashing secrets in bulk.

Account numbers are unique among accounts that are not deleted (the partial
unique index ``accounts_number_live_key``). :func:`generate_numbers` draws
random candidates and checks them against that index in bulk, so 10,000 numbers
cost one or two queries; when the number space is small or nearly full it
enumerates the free numbers instead. It never loops forever: it first counts
the free numbers (ASTPP's capacity) and refuses a request that cannot fit, and
every loop has a bound.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import psycopg

from engine.db.hashing import SCRYPT_N, hash_secret

_RNG = secrets.SystemRandom()

# Enumerate every free number (instead of sampling) when the space is at most this big.
DENSE_LIMIT = 2_000_000
# pg_advisory_xact_lock key held while numbers are generated and inserted.
NUMBERS_LOCK_KEY = 0x63676E756D626572  # "cgnumber"
PASSWORD_SCRYPT_N = SCRYPT_N  # the fixture loader's factor: one rule for passwords everywhere


class NotEnoughNumbers(Exception):
    def __init__(self, free: int) -> None:
        self.free = free
        super().__init__(f"only {free} free numbers")


def _space(length: int, prefix: str) -> tuple[int, int]:
    """The integer range of the random part. Without a prefix the first digit is 1-9, so a
    generated number never starts with 0 (spreadsheets drop leading zeros)."""
    k = length - len(prefix)
    if k <= 0:
        return 0, 0
    return (0, 10**k) if prefix else (10 ** (k - 1), 10**k)


def _filter(length: int, prefix: str) -> tuple[str, list[Any]]:
    if prefix:
        return "char_length(number) = %s AND left(number, %s) = %s", [length, len(prefix), prefix]
    return "char_length(number) = %s AND left(number, 1) <> '0'", [length]


def used_numbers(conn: psycopg.Connection[Any], length: int, prefix: str) -> int:
    """Live accounts whose number has `length` digits and starts with `prefix`."""
    where, params = _filter(length, prefix)
    row = conn.execute(f"SELECT count(*) FROM accounts WHERE NOT deleted AND {where}", params).fetchone()
    return int(row[0]) if row else 0


def capacity(conn: psycopg.Connection[Any], length: int, prefix: str) -> int:
    """How many more numbers fit: ASTPP's 10^(length - len(prefix)) minus those in use."""
    low, high = _space(length, prefix)
    return high - low - used_numbers(conn, length, prefix)


def taken_numbers(conn: psycopg.Connection[Any], numbers: Sequence[str]) -> set[str]:
    """Which of `numbers` a live account already has (one index probe each, one round trip)."""
    if not numbers:
        return set()
    rows = conn.execute(
        "SELECT number FROM accounts WHERE NOT deleted AND number = ANY(%s)", [list(numbers)]
    ).fetchall()
    return {r[0] for r in rows}


def generate_numbers(
    conn: psycopg.Connection[Any],
    count: int,
    length: int,
    prefix: str = "",
    *,
    exclude: Iterable[str] = (),
    rng: Any = _RNG,
) -> list[str]:
    """`count` distinct free numbers of `length` digits starting with `prefix`, in random order.

    `exclude` holds numbers already promised elsewhere (e.g. earlier rows of an import).
    Raises NotEnoughNumbers when fewer than `count` are free.
    """
    if count <= 0:
        return []
    low, high = _space(length, prefix)
    k = length - len(prefix)
    excluded = {int(n[len(prefix) :]) for n in exclude if len(n) == length and n.startswith(prefix)}
    free = high - low - used_numbers(conn, length, prefix) - len(excluded)
    if count > free:
        raise NotEnoughNumbers(max(free, 0))

    def fmt(i: int) -> str:
        return prefix + str(i).zfill(k)

    if high - low <= DENSE_LIMIT or free < 4 * count:
        where, params = _filter(length, prefix)
        taken = excluded | {
            int(r[0][len(prefix) :])
            for r in conn.execute(f"SELECT number FROM accounts WHERE NOT deleted AND {where}", params)
        }
        if high - low <= DENSE_LIMIT:
            pool = [i for i in range(low, high) if i not in taken]
            return [fmt(i) for i in rng.sample(pool, count)]
        chosen: set[int] = set()
        budget = 1000 * count + 1_000_000
        while len(chosen) < count and budget > 0:
            budget -= 1
            i = rng.randrange(low, high)
            if i not in taken:
                chosen.add(i)
        if len(chosen) < count:
            raise NotEnoughNumbers(len(chosen))
        return [fmt(i) for i in chosen]

    picked: list[str] = []
    seen = set(excluded)
    for _ in range(64):
        need = count - len(picked)
        if need == 0:
            break
        candidates: list[str] = []
        while len(candidates) < need + need // 4 + 8:
            i = rng.randrange(low, high)
            if i not in seen:
                seen.add(i)
                candidates.append(fmt(i))
        in_use = taken_numbers(conn, candidates)
        picked.extend(n for n in candidates if n not in in_use)
    if len(picked) < count:
        raise NotEnoughNumbers(len(picked))
    return picked[:count]


def generate_pin(length: int, rng: Any = _RNG) -> str:
    return "".join(rng.choice(string.digits) for _ in range(length))


_ALNUM = string.ascii_letters + string.digits


def generate_password(length: int = 14, rng: Any = _RNG) -> str:
    """Letters and digits, at least one of each (so it passes the account password rule)."""
    while True:
        text = "".join(rng.choice(_ALNUM) for _ in range(length))
        if any(c.isdigit() for c in text) and any(c.isalpha() for c in text):
            return text


def _executor(threads: int) -> Any:
    """Native threads (hashlib.scrypt releases the GIL), also under gevent's monkey-patching."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            from gevent.threadpool import ThreadPoolExecutor as GeventExecutor

            return GeventExecutor(max_workers=threads)
    except ImportError:  # pragma: no cover - gevent is a dependency
        pass
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=threads)


def hash_all(
    values: Sequence[str | None],
    *,
    n: int,
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> list[str | None]:
    """hash_secret(v, n=n) for each value (None stays None), on `threads` threads, in order."""
    work = [(i, v) for i, v in enumerate(values) if v is not None]
    out: list[str | None] = [None] * len(values)
    if not work:
        return out
    hash_one = partial(hash_secret, n=n)
    if threads <= 1 or len(work) < 8:
        for i, v in work:
            out[i] = hash_one(v)
            if progress:
                progress(1)
        return out
    size = max(1, min(64, len(work) // (threads * 4) or 1))
    groups = [work[s : s + size] for s in range(0, len(work), size)]

    def run(group: list[tuple[int, str]]) -> list[tuple[int, str]]:
        return [(i, hash_one(v)) for i, v in group]

    executor = _executor(threads)
    try:
        for result in executor.map(run, groups):
            for i, h in result:
                out[i] = h
            if progress:
                progress(len(result))
    finally:
        executor.shutdown(wait=True)
    return out
