"""The compiled ESL framer under AddressSanitizer and UndefinedBehaviorSanitizer.

    python -m loadtest.memcheck [--fuzz-seconds 60]

Copies the checkout (``git ls-files``) into a temporary directory, builds
``engine/esl/_speedups.c`` there with ``-fsanitize=address,undefined`` (the machine's gcc),
then runs, with libasan preloaded into the (uninstrumented) interpreter and
``PYTHONMALLOC=malloc`` so that every buffer is a malloc block ASan watches:
``tests/test_esl_protocol.py`` (the differential tests: every split point, random streams,
malformed input, limits) and ``loadtest.fuzz_esl`` for ``--fuzz-seconds``. Leak detection is
off (the interpreter itself never frees everything at exit). Any ASan/UBSan report fails the
run. Needs gcc and libasan (Debian: gcc's own package ships it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"


def libasan() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    return os.path.realpath(path.stdout.strip())


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if name.endswith(".so") or not (ROOT / name).is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.memcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-seconds", type=float, default=60.0)
    # The every-split comparison of the captures (~150k parses of up to 94 KiB by both parsers)
    # takes hours under ASan; the random splits and the fuzz loop cover the compiled paths.
    parser.add_argument(
        "--pytest-args",
        default="-q -x -p no:cacheprovider --timeout=3600 -k 'not every_split_of_the_captures'",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="callgate-asan-") as tmp:
        work = Path(tmp)
        copy_checkout(work)
        env = dict(os.environ, CFLAGS=SANITIZE, LDFLAGS="-fsanitize=address,undefined")
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=work, env=env, check=True
        )
        built = list((work / "engine" / "esl").glob("_speedups*.so"))
        assert built, "the sanitized extension was not built"
        assert b"__asan_report" in built[0].read_bytes(), "the extension was built without ASan"
        run_env = dict(
            os.environ,
            LD_PRELOAD=libasan(),
            ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
            PYTHONMALLOC="malloc",
            PYTHONPATH=str(work),
        )
        run_env.pop("CALLGATE_NO_SPEEDUPS", None)
        check = [
            sys.executable,
            "-c",
            "import engine.esl.protocol as p, sys; print(p.__file__, p.speedups_status());"
            "sys.exit(p.IMPLEMENTATION != 'compiled' or not p.__file__.startswith(sys.argv[1]))",
            str(work),
        ]
        subprocess.run(check, cwd=work, env=run_env, check=True)
        pytest = [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_esl_protocol.py",
            *shlex.split(args.pytest_args),
        ]
        subprocess.run(pytest, cwd=work, env=run_env, check=True)
        if args.fuzz_seconds > 0:
            fuzz = [sys.executable, "-m", "loadtest.fuzz_esl", "--seconds", str(args.fuzz_seconds)]
            subprocess.run(fuzz, cwd=work, env=run_env, check=True)
    print("memcheck: no AddressSanitizer or UndefinedBehaviorSanitizer report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
