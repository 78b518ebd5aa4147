"""Reading FineTuneJob manifests from files as `kubectl apply -f` reads them.

kubectl's YAML reader (sigs.k8s.io/yaml) turns YAML into JSON before the API server sees it, and its
numbers are JSON's: `learningRate: 1e-4` is a float there, while PyYAML's YAML 1.1 resolver makes it
the string "1e-4" (1.1 wants a dot in a float) and `2024-01-01` a date JSON has no type for. So the
plain scalars a manifest holds are resolved by YAML 1.2's core schema (ints in decimal, 0o octal and
0x hex; floats with or without a dot, .inf, .nan; null; true/false) and dates stay strings. Booleans
keep YAML 1.1's yes/no/on/off, which kubectl's reader also takes as booleans.

Every way a file can fail to be one or more FineTuneJobs ends as a `CliError` with one line that
names the file, what is wrong and what to do; the CLI prints it and exits with its code.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from finetune_operator import contract
from finetune_operator.api.job import API_VERSION
from finetune_operator.cli_errors import EXIT_INPUT_MISSING, EXIT_INVALID, CliError


class ManifestLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema numbers and no timestamps (see the module docstring)."""


_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # "017" is seventeen in YAML 1.2 and in JSON's reading, not octal


ManifestLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in {
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip
# The int resolver first: the float pattern also matches "42".
ManifestLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))
ManifestLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
ManifestLoader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def load_documents(path: Path) -> list[Any]:
    """Every document in the file (empty ones left out), or a CliError saying why there are none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CliError(EXIT_INPUT_MISSING, f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise CliError(EXIT_INPUT_MISSING, f"{path}: is a directory; name a manifest file in it") from None
    except PermissionError:
        raise CliError(EXIT_INPUT_MISSING, f"{path}: permission denied; make the file readable") from None
    except UnicodeDecodeError:
        raise CliError(EXIT_INVALID, f"{path}: not a text file; a manifest is YAML or JSON") from None
    except OSError as exc:
        raise CliError(EXIT_INPUT_MISSING, f"{path}: cannot be read ({exc.strerror})") from None
    try:
        docs = list(yaml.load_all(text, Loader=ManifestLoader))  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(EXIT_INVALID, f"{path}: not valid YAML{at}: {problem}") from None
    return [doc for doc in docs if doc is not None]


def _shape(doc: Any) -> str:
    if isinstance(doc, list):
        return "a YAML list"
    return f"a {type(doc).__name__} scalar ({str(doc)[:40]!r})"


def _looks_meant(doc: dict[str, Any]) -> bool:
    """A document that was meant to be a FineTuneJob: our apiVersion, or a kind one typo away."""
    kind, version = doc.get("kind"), doc.get("apiVersion")
    if isinstance(version, str) and version.split("/")[0] == contract.API_GROUP:
        return True
    if isinstance(kind, str):
        return difflib.SequenceMatcher(None, kind.lower(), contract.KIND.lower()).ratio() >= 0.8
    return "kind" not in doc and isinstance(doc.get("spec"), dict)


def finetune_jobs(path: Path, docs: list[Any]) -> list[dict[str, Any]]:
    """The documents of kind FineTuneJob (other kinds beside them are skipped, as a file applied
    with other objects holds them), or a CliError for a document that is no object, a FineTuneJob
    whose kind is misspelt or missing, or a file without any."""
    jobs: list[dict[str, Any]] = []
    for index, doc in enumerate(docs, start=1):
        where = f"{path}: document {index}" if len(docs) > 1 else str(path)
        if not isinstance(doc, dict):
            raise CliError(
                EXIT_INVALID,
                f"{where} is {_shape(doc)}, not a mapping: a FineTuneJob manifest is a mapping with "
                "apiVersion, kind, metadata and spec",
            )
        if doc.get("kind") == contract.KIND:
            jobs.append(doc)
        elif _looks_meant(doc):
            got = f"kind {doc['kind']!r}" if "kind" in doc else "no kind"
            raise CliError(
                EXIT_INVALID, f"{where} has {got}: set kind: {contract.KIND} (apiVersion: {API_VERSION})"
            )
    if not jobs:
        kinds = sorted({str(d.get("kind", "no kind")) for d in docs})
        found = f"its documents are: {', '.join(kinds)}" if docs else "the file is empty"
        raise CliError(EXIT_INVALID, f"{path}: no FineTuneJob in this file ({found}); see examples/ for one")
    return jobs


def read_jobs(path: Path) -> list[dict[str, Any]]:
    """The FineTuneJob documents of a file, as kubectl would read them (not yet validated)."""
    return finetune_jobs(path, load_documents(path))
