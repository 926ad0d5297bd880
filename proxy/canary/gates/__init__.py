"""Metric gates: external evidence (Prometheus, HTTP/JSON) judged beside the built-in checks.

``result`` (the outcome of one evaluation), ``fetch`` (one bounded GET: no redirects, capped body,
a timeout), ``providers`` (Prometheus and HTTP/JSON answers turned into numbers), ``runner`` (a
group's gates concurrently, one shared client, streaks) and ``decide`` (pure: gate records plus the
built-in verdict give the verdict the leader acts on). The grammar of conditions and JSONPath is
``proxy.gatespec`` (parsed with the settings). Same import rules as ``proxy.canary``.
"""
