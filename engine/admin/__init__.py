"""Customer management for admins: ASTPP's customer module as a CLI and a JSON HTTP API.

- :mod:`.service`: the one service layer (rules, validation, transactions, audit);
- :mod:`.schemas`: the pydantic models both front ends validate with;
- :mod:`.api`: the WSGI application and its OpenAPI document (``callgate api``);
- :mod:`.cli`: ``callgate admin ...`` and ``callgate api``;
- :mod:`.numbers`: account numbers, PINs and passwords; :mod:`.csvio`: CSV import/export;
- :mod:`.settings`: the ``[admin]`` configuration section.

See docs/admin.md.
"""
