"""Path normalisation for rule matching only; the request is always forwarded byte for byte.

Rules (admin prefix, deprecations, route groups) match the normalised form so ``//old``,
``/a/../old`` or ``/./old`` cannot slip past a rule that names ``/old``.
"""

from __future__ import annotations

import posixpath


def normalise(path: str) -> str:
    """Collapse ``//``, resolve ``.`` and ``..``; keep a trailing slash. Fast when already clean."""
    if "//" not in path and "/." not in path:
        return path
    trailing = path.endswith("/") and len(path) > 1
    clean = posixpath.normpath("/" + path.lstrip("/"))
    if clean.startswith("//"):
        clean = "/" + clean.lstrip("/")
    return clean + "/" if trailing and not clean.endswith("/") else clean


def is_canonical(path: str, raw_path: bytes | None) -> bool:
    """True when the client spelled the path plainly: no escapes, no dot or empty segments."""
    if raw_path is not None and raw_path != path.encode("utf-8", "surrogateescape"):
        return False
    return normalise(path) == path


def strip_params(path: str) -> str:
    """The (normalised) path without ``;params`` in any segment, as servlet containers route it:
    ``/old;v=1/x`` and ``/a/..;/old`` are ``/old/x`` and ``/old`` there, so rules (deprecations,
    route groups) match this form too. The same object when there is no ``;`` (the common case)."""
    if ";" not in path:
        return path
    return normalise("/".join(segment.partition(";")[0] for segment in path.split("/")))
