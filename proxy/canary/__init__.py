"""Canary: per-version windows, the health verdict, automatic rollback, the rollout ladder and alerts.

May import ``proxy.control``, ``proxy.settings``, ``proxy.metrics``, ``proxy.background`` and (for
its commands) ``proxy.cliutil``; never ``proxy.traffic`` internals (it plugs into the hot path only
through the ``Recorder`` protocol) and never another capability (the shadow report and parity
results are read through functions their owners provide, handed in by ``app.py``).
"""
