"""Strangler: a reverse proxy for zero-downtime v1 -> v2 migrations."""

__version__ = "0.1.0"


def build() -> str:
    """'compiled (mypyc)' when the request path runs as C extensions (a wheel built with a C
    compiler, see setup.py), else 'pure Python' (an editable install, or no compiler)."""
    import importlib.machinery

    from proxy.edge import server

    compiled = (server.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return "compiled (mypyc)" if compiled else "pure Python"
