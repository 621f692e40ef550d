"""A TCP proxy between FreeSWITCH's ``socket`` application and the engine that delays one direction.

Two of the suite's cases need a socket path slower than loopback, which is what a saturated switch
or an overloaded engine looks like from the other side:

- ``slow-replies`` (issue 14, defect 1): FreeSWITCH's answers reach the engine late
  (``--towards engine``), later than the engine's ``engine.reply_timeout``.
- ``abandoned``: the engine's ``connect`` reaches FreeSWITCH late (``--towards switch``), so a
  caller who gives up quickly is gone before FreeSWITCH reads it.

Point a dialplan extension's ``socket`` at the proxy and give the extension's prefix to the suite
(``--slow-prefix`` / ``--late-prefix``)::

    python -m loadtest.sipp delay-proxy --listen 127.0.0.1:18087 --to 127.0.0.1:8084 \\
        --delay 0.5 --towards engine

Each chunk read is held ``delay`` seconds and then written. Order is kept, and the other direction
passes at once. A proxy that cannot reach the engine closes FreeSWITCH's connection, as a refused
port would. This is lab tooling, never a production path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable

TOWARDS = ("engine", "switch")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def handler(target: tuple[str, int], delay: float, towards: str) -> Handler:
    """The connection handler for :func:`asyncio.start_server`."""
    if towards not in TOWARDS:
        raise ValueError(f"towards: one of {TOWARDS}")
    to_engine, to_switch = (delay, 0.0) if towards == "engine" else (0.0, delay)

    async def handle(switch_reader: asyncio.StreamReader, switch_writer: asyncio.StreamWriter) -> None:
        try:
            engine_reader, engine_writer = await asyncio.open_connection(*target)
        except OSError:
            switch_writer.close()
            return
        await asyncio.gather(
            _pump(switch_reader, engine_writer, to_engine), _pump(engine_reader, switch_writer, to_switch)
        )

    return handle


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sipp delay-proxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--listen", required=True, help="host:port FreeSWITCH's socket application connects to"
    )
    parser.add_argument("--to", required=True, help="the engine's host:port")
    parser.add_argument("--delay", type=float, required=True, help="seconds each chunk is held")
    parser.add_argument("--towards", choices=TOWARDS, required=True, help="which direction is delayed")
    args = parser.parse_args(argv)

    async def serve() -> None:
        host, port = _address(args.listen)
        server = await asyncio.start_server(handler(_address(args.to), args.delay, args.towards), host, port)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
