"""Manifests are read as kubectl reads them (sigs.k8s.io/yaml on go-yaml v2, whose numbers are Go's
ParseInt and its float pattern), so a value means the same to `ftjob` as to the API server."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml
from finetune_operator.manifests import ManifestLoader


def _value(text: str) -> Any:
    return yaml.load(f"v: {text}\n", Loader=ManifestLoader)["v"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-4", 1e-4),  # PyYAML's YAML 1.1 reads a string: it wants a dot
        ("3E5", 3e5),
        ("1.0e-4", 1e-4),
        ("0.5", 0.5),
        ("-2.5", -2.5),
        (".5", 0.5),
        ("42", 42),
        ("-7", -7),
        ("017", 15),  # Go's ParseInt(s, 0): a leading 0 is octal
        ("089", 89.0),  # not octal, so go-yaml's float pattern takes it
        ("0o17", 15),
        ("0x1F", 31),
        ("0b101", 5),
        ("1_000", 1000),  # go-yaml drops "_" before parsing
        ("-0x10", -16),
        ("true", True),
        ("false", False),
        ("null", None),
        ("2024-01-01", "2024-01-01"),  # no timestamps: JSON has no such type
        ("'1e-4'", "1e-4"),  # quoted stays a string
        ("1:30", "1:30"),  # YAML 1.1's base 60 (PyYAML: 90) is a string to go-yaml
    ],
)
def test_a_plain_scalar_is_read_as_yaml_12(text: str, value: object) -> None:
    read = _value(text)
    assert read == value and type(read) is type(value)


def test_infinity_and_nan_are_floats() -> None:
    assert _value(".inf") == math.inf and math.isnan(_value(".nan"))
