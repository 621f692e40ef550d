"""The web admin (`callgate web`): ASTPP's customer screens in a browser, on the admin service layer.

- :mod:`engine.web.app`: the Flask application, sign-in and sessions, CSRF, error pages;
- :mod:`engine.web.views`: the pages (grid, forms, jobs, the account page's tabs);
- :mod:`engine.web.tabs`: which service calls each tab makes;
- :mod:`engine.web.forms`: forms drawn from the service's models, posts read back into them;
- :mod:`engine.web.auth`: who may sign in, throttling of failed sign-ins;
- :mod:`engine.web.jobs`: mass create and import in the background, with progress;
- :mod:`engine.web.explain`: "why was this call rejected?" for one account;
- :mod:`engine.web.server`: the threaded HTTP server and ``callgate web hash-password``.

See docs/web-admin.md.
"""
