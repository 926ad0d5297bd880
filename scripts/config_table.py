#!/usr/bin/env python3
"""Print the README configuration table from config/strangler.example.yaml.

The example file is the one place each setting is explained (a comment per line); this turns it
into the README table (key, environment variable, default, meaning). tests/test_docs.py checks the
README holds exactly this output and that the example's defaults are the code's defaults.
Usage: scripts/config_table.py [--write]   (--write replaces the table in README.md)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "strangler.example.yaml"
README = ROOT / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
LINE = re.compile(r"^(?P<indent> *)(?P<dash>- )?(?P<key>[a-z_0-9]+):(?P<rest>.*)$")


def rows(text: str) -> list[tuple[str, str, str, str]]:
    """(dotted key, env var, default, meaning) for every setting line of the example file."""
    out: list[tuple[str, str, str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, name) of open sections
    headers: list[str] = []  # comments of section header lines, latest last
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = LINE.match(raw)
        if not match:
            continue
        indent = len(match["indent"]) + (2 if match["dash"] else 0)
        value, _, comment = match["rest"].partition(" #")
        value, comment = value.strip(), comment.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match["dash"] and stack and not stack[-1][1].endswith("[]"):
            # the first item of a list section: the section itself is a setting (default: empty)
            list_path = [name for _, name in stack]
            out.append((".".join(list_path), "STRANGLER_" + "__".join(list_path).upper(), "[]", headers[-1]))
            stack[-1] = (stack[-1][0], stack[-1][1] + "[]")
        path = [name for _, name in stack] + [match["key"]]
        if not value:  # a section header
            stack.append((indent, match["key"]))
            headers.append(comment)
            continue
        key = ".".join(path)
        env = "—" if "[]" in key else "STRANGLER_" + "__".join(path).upper()
        out.append((key, env, value, comment))
    return out


def table(text: str) -> str:
    lines = ["| key | environment variable | default | meaning |", "|---|---|---|---|"]
    for key, env, default, meaning in rows(text):
        shown = "(example)" if "[]" in key else f"`{default}`"
        lines.append(f"| `{key}` | `{env}` | {shown} | {meaning.replace('|', '/')} |".replace("`—`", "—"))
    return "\n".join(lines)


def main() -> None:
    generated = table(EXAMPLE.read_text())
    if "--write" not in sys.argv:
        print(generated)
        return
    readme = README.read_text()
    before, _, rest = readme.partition(START)
    _, _, after = rest.partition(END)
    README.write_text(f"{before}{START}\n{generated}\n{END}{after}")


if __name__ == "__main__":
    main()
