"""Where the engine's time goes: py-spy around a load run, folded into a short table.

``python -m loadtest.profile --pid <engine pid> --seconds 20`` records with py-spy
(``--nonblocking``: the engine is never paused) while load runs, then prints the
functions with the most samples, inclusive (the function and what it calls) and self
(the function's own lines). Collapsed stacks come from ``py-spy record -f raw``;
``summarize_collapsed`` reads any such file.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["record", "summarize_collapsed", "top_table"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _frame_key(frame: str, with_line: bool = False) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    key = f"{match['func']} ({path}"
    if with_line and match["line"]:
        key += f":{match['line']}"
    return key + ")"


def summarize_collapsed(text: str) -> dict[str, Any]:
    """Inclusive and self sample counts per function from py-spy's raw (collapsed) output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        total += count
        keys = [_frame_key(f) for f in frames]
        for key in set(keys):
            inclusive[key] += count
        if keys:
            own[keys[-1]] += count
    return {"samples": total, "inclusive": inclusive, "self": own}


def top_table(summary: dict[str, Any], n: int = 25) -> str:
    total = max(1, summary["samples"])
    lines = [f"{summary['samples']} samples", "", "inclusive  self   function"]
    incl: Counter[str] = summary["inclusive"]
    own: Counter[str] = summary["self"]
    for key, count in incl.most_common(n):
        lines.append(f"{100 * count / total:6.1f}%  {100 * own.get(key, 0) / total:5.1f}%  {key}")
    lines += ["", "self time  function"]
    for key, count in own.most_common(n):
        lines.append(f"{100 * count / total:6.1f}%   {key}")
    return "\n".join(lines)


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen:
    """Start py-spy on ``pid`` for ``seconds`` (raw collapsed stacks into ``out``)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    cmd = [
        str(py_spy if py_spy.exists() else "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, help="process to sample (py-spy needs ptrace rights)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--raw", type=Path, default=Path("profile.raw"), help="collapsed stacks file")
    parser.add_argument("--summarize", action="store_true", help="only summarize an existing --raw file")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if not args.summarize:
        if args.pid is None:
            parser.error("--pid is required to record")
        record(args.pid, args.seconds, args.raw).wait()
    print(top_table(summarize_collapsed(args.raw.read_text()), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
