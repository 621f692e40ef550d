"""Background jobs for the long work of the web admin: mass create and CSV import.

A job runs in a thread of its own with its own database connection, so the page that started it
returns at once and a few lines of JavaScript poll its progress (``/jobs/<id>.json``). Jobs are
bounded: at most ``[web] max_jobs`` run at once (another start is refused with a message), and
the last ``KEEP_FINISHED`` finished ones are kept for their result pages. A job is seen only by
the user who started it; anyone else gets "not found".
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.admin.errors import AdminError

log = logging.getLogger("callgate.web.jobs")

KEEP_FINISHED = 20


class Busy(Exception):
    """Too many jobs are running."""


@dataclass
class Job:
    """One piece of long work; also the service's Progress (begin/advance/end)."""

    owner: str
    kind: str  # "mass-create" or "import"
    label: str
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    total: int | None = None
    phase: str = ""
    done: int = 0
    state: str = "running"  # running, done, failed
    error: str = ""
    result: Any = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def begin(self, total: int | None, label: str) -> None:
        self.total, self.done, self.phase = total, 0, label

    def advance(self, n: int = 1) -> None:
        self.done += n

    def end(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "phase": self.phase,
            "error": self.error,
            "seconds": round((self.finished or time.time()) - self.started, 1),
        }


class Jobs:
    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def running(self) -> int:
        return sum(1 for job in self._jobs.values() if job.state == "running")

    def start(self, job: Job, work: Callable[[Job], Any]) -> Job:
        """Run `work(job)` in a thread; its return value becomes job.result. Busy if too many run."""
        with self._lock:
            if self.running() >= self.max_running:
                raise Busy(f"{self.max_running} jobs are running already; try again when one has finished")
            self._jobs[job.id] = job
            finished = [j.id for j in self._jobs.values() if j.state != "running"]
            for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
                del self._jobs[old]

        def run() -> None:
            try:
                job.result = work(job)
                job.state = "done"
            except AdminError as exc:  # the service's refusal, in its words (never a secret)
                job.error = str(exc)
                job.state = "failed"
            except Exception:  # the traceback goes to the log only
                log.exception("job %s (%s) failed", job.id, job.kind)
                job.error = "the job failed (see the server log)"
                job.state = "failed"
            finally:
                job.finished = time.time()

        threading.Thread(target=run, name=f"web-job-{job.kind}", daemon=True).start()
        return job

    def get(self, job_id: str, owner: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None
