"""``callgate api``: the application on gevent's WSGI server."""

from __future__ import annotations

import logging
from typing import Any

from engine.admin.settings import admin_settings

from .app import create_app, shutdown
from .http import PREFIX

log = logging.getLogger("callgate.admin.api")


def serve(config: Any, host: str | None = None, port: int | None = None) -> int:
    """Run the API on gevent's WSGI server until interrupted (the caller monkey-patched already)."""
    import signal

    import gevent
    from gevent.pywsgi import WSGIServer

    from engine.logs import setup_logging

    setup_logging(config.logging)
    settings = admin_settings(config)
    app = create_app(config, settings)
    address = (host or settings.listen_host, settings.listen_port if port is None else port)
    server = WSGIServer(address, app, log=logging.getLogger("callgate.admin.access"), error_log=log)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.close)  # stop accepting; requests in flight finish
    print(f"callgate admin API listening on http://{address[0]}:{server.server_port}{PREFIX}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=5)
        shutdown(app)
    return 0
