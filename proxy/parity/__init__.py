"""``strangler parity``: prove the new data store holds the same data as the old one (SQL and HTTP).

Offline tooling beside the proxy: it never runs on the request path. May import ``proxy.control``
(Redis keys), ``proxy.shadow.compare`` (the JSON diff engine, for the HTTP walker) and
``proxy.settings`` and ``proxy.cliutil`` (its commands); only the CLI and ``app.py`` import it.
"""
