"""``callgate cdr replay <dir>``: post the CDRs FreeSWITCH saved in its err-log-dir back to ``/cdr``.

After its last failed attempt mod_json_cdr writes each CDR to ``<err-log-dir>/<uuid>.cdr.json``
(the text as it would have posted it: the JSON with ``encode=false``, the URL-encoded JSON or
its base64 without ``cdr=`` otherwise) and never looks at it again. This posts each file to the
running ``callgate fsxml`` over HTTP, as FreeSWITCH would have.

Why over HTTP rather than calling the receiver in this process: the endpoint already holds the
current snapshot (the accounts' ``calls_debited``, read whole: ~190 MiB and seconds to load for
a large deployment), its Redis connection and its metrics, and applies the same access check
as for FreeSWITCH; a replay through it is exactly a late post, counted and logged like one.

Per file, by the endpoint's answer:

* 200 ``billed`` / ``already billed`` / ``ignored``: done, the file is moved to ``<dir>/replayed/``
  (same file system: an atomic rename), so a rerun does not post it again;
* 4xx (``refused``: not a CDR, a bad ticket, credentials) and 503 or no answer (``unavailable``):
  the file stays where it is, the run exits non-zero. Nothing is ever deleted.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.fsxml.jsoncdr import FORM, FORM_BASE64, JSON

SUFFIX = ".cdr.json"
DONE_DIR = "replayed"
_DONE_ANSWERS = {"billed": "billed", "already billed": "already billed", "ignored": "ignored"}


@dataclass(frozen=True, slots=True)
class FileResult:
    path: Path
    outcome: str  # billed, already billed, ignored, refused, unavailable
    detail: str  # the HTTP status and answer, or the error (never a credential)

    @property
    def done(self) -> bool:
        return self.outcome in _DONE_ANSWERS.values()


def request_body(text: str) -> tuple[bytes, str]:
    """The body and content type to post for an err-log-dir file's text: what mod_json_cdr
    would have sent. JSON starts with ``{``; URL-encoded JSON with ``%7B``; else base64."""
    text = text.strip()
    if text.startswith("{"):
        return text.encode("utf-8"), JSON
    if text[:3].upper() == "%7B":
        return b"cdr=" + text.encode("utf-8"), FORM
    return b"cdr=" + text.encode("utf-8"), FORM_BASE64


def saved_cdrs(directory: Path) -> Iterator[Path]:
    """The CDR files of an err-log-dir, oldest first (replayed ones live in a subdirectory)."""
    found = [p for p in directory.iterdir() if p.name.endswith(SUFFIX) and p.is_file()]
    yield from sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


Post = Callable[[bytes, str], tuple[int, str]]


def http_poster(url: str, username: str, password: str, timeout: float) -> Post:
    """POST to the endpoint: (status, answer text); status 0 when nothing answered."""
    headers = {"User-Agent": "callgate-cdr-replay"}
    if username:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        headers["Authorization"] = "Basic " + token

    def post(body: bytes, content_type: str) -> tuple[int, str]:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={**headers, "Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, reply.read(200).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(200).decode("utf-8", "replace").strip()
        except (OSError, ValueError) as exc:  # refused, timed out, bad URL: the reason, not the request
            return 0, type(exc).__name__ + ": " + str(getattr(exc, "reason", exc))[:200]

    return post


def replay_file(path: Path, post: Post, done_dir: Path) -> FileResult:
    try:
        body, content_type = request_body(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        return FileResult(path, "unavailable", f"not readable: {exc.strerror}")
    status, answer = post(body, content_type)
    if status == 200 and answer in _DONE_ANSWERS:
        done_dir.mkdir(exist_ok=True)
        os.replace(path, done_dir / path.name)
        return FileResult(path, _DONE_ANSWERS[answer], f"{status} {answer}")
    if status == 0 or status >= 500:
        return FileResult(path, "unavailable", f"{status or 'no answer'} {answer}".strip())
    return FileResult(path, "refused", f"{status} {answer}".strip())


def replay_directory(directory: Path, post: Post, done_dir: Path | None = None) -> list[FileResult]:
    """Replay every saved CDR of ``directory``; the done ones move to ``done_dir``."""
    target = done_dir or directory / DONE_DIR
    return [replay_file(path, post, target) for path in saved_cdrs(directory)]
