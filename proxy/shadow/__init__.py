"""Shadow traffic: mirror v1-served requests to v2, compare the answers, keep a shared diff report.

May import ``proxy.traffic`` (hooks, routing, upstream), ``proxy.control``, ``proxy.settings``,
``proxy.metrics`` and (for its commands) ``proxy.cliutil``; nothing imports it except the
composition root (``app.py``), ``admin/`` (its routes), parity (the diff engine) and the CLI.
Of the gRPC extras, only ``descriptors.py`` imports ``protobuf`` (and, for server reflection,
``grpcio``), and only when a descriptor set or reflection is configured.
"""
