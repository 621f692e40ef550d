"""The catalogue image producer: ``callgate image publish``, and the sync worker's child process.

Builds the current snapshot version's catalogue exactly as an engine does and publishes its
image in Redis (``engine.state.imageblob``), so that an engine starting on a host without a
local image (a new host, a new version) fetches it instead of decoding every row.

Process wiring only (the commands layer): it joins the state layer's producer with the rules'
``Catalog.build`` and the code fingerprint the engines compute (``engine.model`` and
``engine.rules``): an image built by other code is ignored by the engines.
"""

from __future__ import annotations

import logging
import os
import socket

import engine.model
import engine.rules
from engine.config import Config
from engine.rules.catalog import RECORD_TYPES, Catalog
from engine.state.image import ImageStore, code_fingerprint
from engine.state.imageblob import PublishResult, publish_current
from engine.state.redisconn import redis_client

__all__ = ["image_fingerprint", "produce_in_child", "publish_image"]

log = logging.getLogger("callgate.image")

# The snapshot is read in bulk and the chunks written whole: the engines' bulk read timeout.
_TIMEOUT = 30.0


def image_fingerprint() -> str:
    """What the engines compute (engine.runtime): images of other code are not theirs."""
    return code_fingerprint([engine.model, engine.rules])


def publish_image(config: Config, *, version: int | None = None, force: bool = False) -> PublishResult | None:
    """Build and publish the current version's image (``version``: only if it is still current).

    None when there is no snapshot, or it moved on from ``version``; ``published=False`` when
    the version already has an image of this code (``force``: build it again).
    """
    client = redis_client(config.redis, socket_timeout=_TIMEOUT, socket_connect_timeout=5)
    try:
        images = ImageStore(None, config.redis.key_prefix, image_fingerprint())
        return publish_current(
            client,
            config.redis.key_prefix,
            Catalog.build,
            images,
            chunk_bytes=config.sync.image_chunk_bytes,
            force=force,
            version=version,
            by=f"{socket.gethostname()}:{os.getpid()}",
            records=RECORD_TYPES,  # as the engines build it (engine.runtime): no model objects
        )
    finally:
        client.close()


def produce_in_child(config: Config, version: int) -> None:
    """The sync worker's child process (multiprocessing, spawn): publish ``version``'s image.

    A child, not a thread: the build holds the GIL for minutes at a million rows and needs
    hundreds of MB, which the sync loop (catch-ups within milliseconds) must not share.
    Never raises: a failed build only means engines load rows; it is logged.
    """
    from engine.logs import setup_logging

    setup_logging(config.logging)
    try:
        result = publish_image(config, version=version)
    except Exception:
        log.warning("catalogue image of version %d not published", version, exc_info=True)
        return
    if result is None:
        log.info("catalogue image of version %d not published: the snapshot moved on", version)
