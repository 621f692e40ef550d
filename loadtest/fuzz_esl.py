"""Differential fuzzing of the compiled ESL framer against the pure-Python one.

    python -m loadtest.fuzz_esl --seconds 60 [--seed 1]

A seeded random loop (no extra package needed): each case is a stream built from real
FreeSWITCH frames (the captures in tests/fixtures) and from frame-shaped noise, damaged at
random (bytes flipped, dropped, inserted; lengths changed), fed in random chunks under random
size limits to ``engine.esl._speedups.EslParser`` and to ``engine.esl.protocol.PyEslParser``.
Frames, errors and ``buffered`` after every feed must be identical; random strings go through
both ``decode_value``s. The first difference stops the run with the seed of the case, which
replays it. Run it under AddressSanitizer with ``python -m loadtest.memcheck``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.esl import protocol
from engine.esl.protocol import ProtocolError, PyEslParser

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SECTION = re.compile(rb"^----- (>>|<<) -----\n", re.MULTILINE)
NOISE = [
    b"Content-Length: 3\n",
    b"Content-Length: 0\n",
    b"Content-Length: 99999999999999999999\n",
    b"Content-Length: 0000000000000000000000012\n",
    b"Content-Type: text/event-plain\n",
    b"Reply-Text: +OK\r\n",
    b"\n",
    b"\r\n",
    b"\r",
    b"\n\r\n",
    b": ",
    b":",
    b" ",
    b"\xe2\x82",
    b"\xff",
    b"9",
    b"Name: v%41",
]


def capture_frames() -> list[bytes]:
    frames: list[bytes] = []
    for name in ("connect_reply_raw.txt", "bridged_call_wire.txt", "respond_403_wire.txt"):
        parts = SECTION.split((FIXTURES / name).read_bytes())
        for direction, content in zip(parts[1::2], parts[2::2], strict=True):
            if direction == b"<<":
                frames.append(content[:-1])
    return frames


def make_case(rng: random.Random, frames: list[bytes]) -> tuple[bytes, list[int], dict[str, int]]:
    pieces = [
        rng.choice(frames) if rng.random() < 0.5 else rng.choice(NOISE) for _ in range(rng.randint(1, 25))
    ]
    data = bytearray(b"".join(pieces))
    for _ in range(rng.choice([0, 0, 1, 2, 8])):
        if not data:
            break
        at = rng.randrange(len(data))
        data[at : at + rng.choice([0, 1, 2])] = rng.choice(
            [b"", b"\n", b"\r", b":", b" ", b"\xff", b"7", b"\x00"]
        )
    cuts = sorted({rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 80))})
    limits: dict[str, int] = {}
    if rng.random() < 0.3:
        limits = {"max_header_bytes": rng.randint(0, 8000), "max_body_bytes": rng.randint(0, 3000)}
    return bytes(data), cuts, limits


def run_parser(parser: Any, data: bytes, cuts: Iterable[int]) -> list[Any]:
    out: list[Any] = []
    points = [0, *cuts, len(data)]
    for a, b in itertools.pairwise(points):
        try:
            frames, error = parser.feed(data[a:b]), ""
        except ProtocolError as exc:
            frames, error = exc.frames, str(exc)
        out.append(
            (error, [(list(f.headers.items()), f.body, f.content_type) for f in frames], parser.buffered)
        )
        if error:
            break
    return out


def random_text(rng: random.Random) -> str:
    pieces = [
        "%",
        "%2",
        "%2B",
        "%2b",
        "%E2%82%AC",
        "%E2%82",
        "%FF",
        "%zz",
        "a",
        "+",
        "_undef_",
        "€",
        "%C3",
        "%00",
    ]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))


def fuzz(seconds: float, seed: int, log: Any = print) -> int:
    """Cases run until `seconds` have passed; raises AssertionError on the first difference."""
    from engine.esl import _speedups

    frames = capture_frames()
    deadline = time.monotonic() + seconds
    case = 0
    while time.monotonic() < deadline:
        rng = random.Random(seed * 1_000_003 + case)
        data, cuts, limits = make_case(rng, frames)
        compiled = run_parser(_speedups.EslParser(**limits), data, cuts)
        python = run_parser(PyEslParser(**limits), data, cuts)
        assert compiled == python, f"difference in case {case} (seed {seed})"
        for _ in range(20):
            text = random_text(rng)
            assert _speedups.decode_value(text) == protocol._py_decode_value(text), (case, text)
        case += 1
    log(f"{case} cases, no difference (seed {seed}, {seconds:g} s)")
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fuzz_esl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    fuzz(args.seconds, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
