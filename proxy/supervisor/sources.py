"""Where the settings came from at start (the ``-c`` file, the environment, the flags), kept so a
reload reads the same sources again, and what a reload may not change in a running proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.settings import ConfigError, Settings, load_settings

# Bound or started once by the parent: a new generation inherits them, it cannot change them.
FIXED = (
    "host", "port", "admin_port", "workers", "embedded_redis_dir", "embedded_redis_port", "control_socket",
)  # fmt: skip
REFUSAL = "cannot change live ({} -> {}); restart or upgrade"
# the listening address moves only with a restart: an upgrade hands the same socket over
RESTART_ONLY = {"host", "port"}


@dataclass(frozen=True)
class Sources:
    config: Path | None = None  # the -c file as given (the parent never changes directory)
    flags: dict[str, Any] = field(default_factory=dict)  # setting -> value given on the command line
    flag_names: dict[str, str] = field(default_factory=dict)  # setting -> the flag, for the error line

    @classmethod
    def recorded(cls, config: Path | None, flag_names: dict[str, str], **flags: Any) -> Sources:
        given = {name: value for name, value in flags.items() if value is not None}
        return cls(config, given, {k: flag_names[k] for k in given})

    def load(self) -> Settings:
        """The settings these sources give now, or ``ConfigError`` (one line)."""
        return load_settings(self.config, self.flag_names, **self.flags)


class CannotChangeLive(ConfigError):
    """A reload that would change a setting only a restart (or an upgrade) can."""


def refuse_fixed(running: Settings, wanted: Settings) -> None:
    for name in FIXED:
        before, after = getattr(running, name), getattr(wanted, name)
        if before != after:
            refusal = REFUSAL.format(before, after)
            if name in RESTART_ONLY:
                refusal = refusal.removesuffix(" or upgrade")
            raise CannotChangeLive(refusal, "reload", name)
    if (running.redis_url is None) != (wanted.redis_url is None):  # the embedded Redis starts with serve
        kinds = ("embedded", "configured") if running.redis_url is None else ("configured", "embedded")
        raise CannotChangeLive(REFUSAL.format(*kinds), "reload", "redis_url")
