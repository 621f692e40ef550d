"""The JSON HTTP API (``callgate api``): Flask + flask-openapi3, served by gevent's WSGI server.

Every route, the OpenAPI document included, needs ``Authorization: Bearer <token>``
(tokens come from ``callgate admin token create``); the token is checked before any
database connection is taken (:mod:`.auth`), and connections come from one bounded pool
(:mod:`.db`). Requests are validated against the pydantic models of
:mod:`engine.admin.schemas`; the work is done by :class:`engine.admin.service.AdminService`.
Errors are bounded JSON: ``{"error": code, "message": ..., "errors": [{"field": ...,
"message": ...}]}``; the statuses are listed in docs/admin-api.md.

- :mod:`.app`: the application, its hooks and error handlers;
- :mod:`.routes`: one blueprint per resource group;
- :mod:`.http`: the JSON codec, error bodies, the request's connection;
- :mod:`.server`: ``callgate api`` on gevent.

JSON numbers in requests are read as ``Decimal`` (never binary floats); money in
responses is a string.
"""

from .app import create_app, shutdown
from .http import PREFIX
from .server import serve

__all__ = ["PREFIX", "create_app", "serve", "shutdown"]
