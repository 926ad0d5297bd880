"""Resume: what a run has finished, written atomically after every chunk.

The file is tied to the configuration by a fingerprint; a checkpoint from a different config is
refused rather than silently mixed in. Keys are stored as JSON (integers and text round-trip
exactly; other key types are stored as text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.parity.normalise import blake2b

if TYPE_CHECKING:
    from proxy.parity.config import ParityConfig


class CheckpointError(ValueError):
    pass


def fingerprint(config: ParityConfig) -> str:
    """Stable digest of what decides the answer (tables, mapping, chunking), not of credentials."""
    data = config.as_dict(exclude={"source", "target", "max_qps", "lag_seconds"})
    return blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


class Checkpoint:
    """``{"fingerprint", "tables": {name: {"plan", "chunks": {id: [raw keys]}, "result"}}}``."""

    def __init__(self, path: Path | None, print_: str, resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {"fingerprint": print_, "tables": {}}
        if path is not None and resume and path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
            if loaded.get("fingerprint") != print_:
                raise CheckpointError(
                    f"checkpoint {path} was written for a different configuration; "
                    "delete it or run without --resume"
                )
            self.data = loaded

    def table(self, name: str) -> dict[str, Any]:
        return self.data["tables"].setdefault(name, {"plan": None, "chunks": {}, "result": None})

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(self.path.suffix + ".tmp")
        temp.write_text(json.dumps(self.data, default=str))
        os.replace(temp, self.path)
