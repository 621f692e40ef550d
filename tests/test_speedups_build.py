"""The compiled ESL framer: the set-up command builds it, and the install runs it unless told not to.

``bash scripts/venv.sh`` installs the package with ``pip install -e``, which runs setup.py's
``build_ext`` with the machine's C compiler. The extension is optional (no compiler: the pure
Python parser, with the reason in ``speedups_status()``), so these tests are what notices a
build that silently fell back: with a C compiler on the machine (or in CI), the compiled
parser must be the active one unless ``CALLGATE_NO_SPEEDUPS`` forces the fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from engine.esl import protocol

ROOT = Path(__file__).resolve().parent.parent
FORCED = os.environ.get(protocol.NO_SPEEDUPS_ENV, "") not in ("", "0")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "") or "cc") or shutil.which("gcc")


def python_headers() -> bool:
    return (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def test_the_install_runs_the_compiled_parser_unless_forced() -> None:
    status = protocol.speedups_status()
    if FORCED:
        assert status["implementation"] == "python", status
        assert protocol.EslParser is protocol.PyEslParser
        return
    if not (os.environ.get("CI") or (compiler() and python_headers())):
        pytest.skip(f"no C compiler or Python headers here, so the fallback is expected: {status['reason']}")
    assert status["implementation"] == "compiled", (
        f"the set-up command (bash scripts/venv.sh) did not build engine/esl/_speedups.c: {status['reason']}"
    )
    assert protocol.EslParser.__module__ == "engine.esl._speedups"


def test_forcing_the_fallback_in_a_new_process() -> None:
    code = (
        "import engine.esl.protocol as p; print(p.IMPLEMENTATION, p.EslParser.__name__, p.speedups_status())"
    )
    env = dict(os.environ, **{protocol.NO_SPEEDUPS_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("python PyEslParser ") and "forced by CALLGATE_NO_SPEEDUPS=1" in out.stdout
    env[protocol.NO_SPEEDUPS_ENV] = "0"  # "0" means not forced
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == ("compiled" if _built() else "python")


def _built() -> bool:
    try:
        from engine.esl import _speedups  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_setup_py_builds_the_extension_with_this_machines_compiler(tmp_path: Path) -> None:
    """What ``pip install -e .`` runs, into a scratch directory; the result parses like Python."""
    if compiler() is None or not python_headers():
        if os.environ.get("CI"):
            pytest.fail("CI has no C compiler or no Python headers: the compiled parser cannot be built")
        pytest.skip("no C compiler or no Python headers on this machine: the install falls back to Python")
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [built] = (tmp_path / "lib" / "engine" / "esl").glob("_speedups*.so")
    check = f"""
import importlib.util, sys
from engine.esl import protocol
spec = importlib.util.spec_from_file_location("engine.esl._speedups", {str(built)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.setup(protocol._frame, protocol.ProtocolError, protocol._bad_line, protocol._content_length,
             protocol._py_decode_value)
data = open({str(ROOT / "tests" / "fixtures" / "connect_reply_raw.txt")!r}, "rb").read()
data = data.split(b"----- << -----\\n", 1)[1].rsplit(b"\\n", 1)[0]
frames = module.EslParser().feed(data)
assert frames == protocol.PyEslParser().feed(data) and len(frames[0].headers) == 165, frames
assert module.decode_value("%2BOK%0A") == "+OK\\n"
print("ok")
"""
    env = dict(os.environ, **{protocol.NO_SPEEDUPS_ENV: "1"})  # the installed copy stays out of the way
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
