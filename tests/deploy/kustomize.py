"""Just enough kustomize to render deploy/kubernetes without the kustomize binary.

Supports what our kustomizations use: ``resources`` (files and directories), ``components``,
``labels`` (``pairs``, added to metadata.labels) and ``patches`` with a ``path`` (strategic merge:
maps merge, lists of maps merge by ``name``, anything else replaces). A kustomization using more
fails loudly, so the renderer never silently drops a feature.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "components", "labels", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise ValueError(f"{directory}: kustomization fields not supported here: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for entry in spec.get("components", []):
        objects.extend(render((directory / entry).resolve()))
    for label in spec.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise ValueError("labels into selectors/templates are not supported here")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for patch in spec.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        target = [o for o in objects if (o["kind"], o["metadata"]["name"]) ==
                  (change["kind"], change["metadata"]["name"])]  # fmt: skip
        if len(target) != 1:
            raise ValueError(f"patch {patch['path']} matches {len(target)} objects")
        merged = merge(target[0], change)
        objects[objects.index(target[0])] = merged
    return objects


def merge(base: Any, change: Any) -> Any:
    if isinstance(base, dict) and isinstance(change, dict):
        out = copy.deepcopy(base)
        for key, value in change.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(change, list)
        and all(isinstance(item, dict) and "name" in item for item in base + change)
    ):
        out = [copy.deepcopy(item) for item in base]
        added = []
        for item in change:
            same = [i for i, existing in enumerate(out) if existing["name"] == item["name"]]
            if same:
                out[same[0]] = merge(out[same[0]], item)
            else:
                added.append(copy.deepcopy(item))
        return added + out  # new items first, as kustomize's strategic merge does
    return copy.deepcopy(change)
