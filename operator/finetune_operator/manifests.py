"""Reading FineTuneJob manifests from files as `kubectl apply -f` reads them.

kubectl's YAML reader (sigs.k8s.io/yaml, on go-yaml v2) turns YAML into JSON before the API server
sees it, and its numbers are not PyYAML's YAML 1.1 ones: `learningRate: 1e-4` is a float there (a
float needs no dot, as in YAML 1.2 and JSON), while PyYAML makes it the string "1e-4"; `1:30` is a
string there, while PyYAML reads base 60. So plain scalars are resolved as go-yaml resolves them:
an integer is what Go's ParseInt(s, 0) takes once "_" is removed (decimal, 0x, 0o, 0b, and a
leading 0 for octal), a float what go-yaml's float pattern takes (`1e-4`, `.5`, `.inf`, `.nan`).
Dates stay strings (no FineTuneJob field is a date, and JSON has no date type). Booleans keep
PyYAML's yes/no/on/off, which go-yaml also takes as booleans.

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
    """SafeLoader with kubectl's numbers and no timestamps (see the module docstring)."""


_INT = re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|0[0-7_]*|[1-9][0-9_]*)$")
_FLOAT = re.compile(
    r"^[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_BASES = {"0b": 2, "0o": 8, "0x": 16}


def _go_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = _BASES.get(digits[:2])
    if base is not None:
        return sign * int(digits[2:], base)
    return sign * int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)


ManifestLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in {
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip
# The int resolver first: the float pattern also matches "42".
ManifestLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
ManifestLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
ManifestLoader.add_constructor("tag:yaml.org,2002:int", _go_int)


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
