"""The Kubernetes schemas the FineTuneJob API embeds (core/v1 Volume and VolumeMount), copied from the
OpenAPI that kubernetes-validate ships for the oldest Kubernetes we support, so the API takes
Kubernetes' own volume shapes instead of an invented copy.

`python -m tools.k8s_schema --write` (part of `make crds`) rewrites
operator/finetune_operator/api/kubernetes_schema.json: the definitions reachable from the roots,
descriptions dropped (the CRD stays small; the Kubernetes API reference documents them). A test
regenerates it and requires the committed file to be the same."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SOURCE_VERSION = "1.29.0"
ROOTS = ("io.k8s.api.core.v1.Volume", "io.k8s.api.core.v1.VolumeMount")
REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "operator" / "finetune_operator" / "api" / "kubernetes_schema.json"


def _definitions() -> dict[str, Any]:
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    data = json.loads((base / f"v{SOURCE_VERSION}-local-strict" / "_definitions.json").read_text())
    defs: dict[str, Any] = data["$defs"]
    return defs


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in sorted(node.items()) if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def snapshot() -> dict[str, Any]:
    defs = _definitions()
    picked: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[-1]
                if name not in picked:
                    picked[name] = _strip(defs[name])
                    walk(defs[name])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for root in ROOTS:
        picked[root] = _strip(defs[root])
        walk(defs[root])
    return {
        "source": f"kubernetes-validate, Kubernetes v{SOURCE_VERSION} (local-strict OpenAPI)",
        "roots": list(ROOTS),
        "definitions": dict(sorted(picked.items())),
    }


def render() -> str:
    return json.dumps(snapshot(), indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"rewrite {TARGET.name}")
    args = parser.parse_args(argv)
    if args.write:
        TARGET.write_text(render())
        print(f"wrote {TARGET}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
