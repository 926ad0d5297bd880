"""Strangler: a reverse proxy for zero-downtime v1 -> v2 migrations."""

__version__ = "0.1.0"
