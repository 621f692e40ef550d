"""``python -m loadtest.chaos [--short]``: the chaos suite (see loadtest/chaos/__init__.py)."""

from gevent import monkey

monkey.patch_all()  # subprocesses, sockets and sleeps cooperate: the in-process proxies never stall

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from loadtest.chaos.run import FAULTS, FULL, SHORT, markdown, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the CI-sized run (about 2 minutes)")
    parser.add_argument("--out", type=Path, help="write chaos.json and chaos.md into this directory")
    parser.add_argument("--fault", action="append", choices=sorted(FAULTS), help="only these (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs (path printed)")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout): unwind, so that every server of the run is stopped by its teardown.
    main_greenlet = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, lambda: main_greenlet.throw(SystemExit(143)))
    logging.basicConfig(
        level=logging.INFO if "CHAOS_DEBUG" in __import__("os").environ else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    command = "python -m loadtest.chaos" + (" --short" if args.short else "")
    data = run(SHORT if args.short else FULL, args.fault or list(FAULTS), args.out, args.keep, command)
    sys.stdout.write(markdown(data))
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
