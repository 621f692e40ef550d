"""A PostgreSQL cluster of a test's own (initdb + pg_ctl on a free port in a temporary
directory), that can be stopped and started: never the shared server on 5432.

The chaos suite's :class:`loadtest.chaos.cluster.PgCluster`; a test skips, rather than fails,
where initdb cannot run here (not installed, or root without a `postgres` user).
"""

from __future__ import annotations

import pytest

from loadtest.chaos.cluster import PgCluster, Unavailable


class PrivatePostgres(PgCluster):
    def __init__(self) -> None:
        try:
            super().__init__()
        except Unavailable as exc:
            pytest.skip(str(exc))

    def init(self) -> PrivatePostgres:
        try:
            super().init()
        except Unavailable as exc:
            self.destroy()
            pytest.skip(str(exc))
        return self
