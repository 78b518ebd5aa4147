"""What the chart ships beside its templates: the CRD (the generated one, byte for byte), a values
schema that names the wrong value, and documentation for every value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from finetune_operator.api.crd import CRD_FILE_NAME

from tests.support.chart import CHART_DIR, render
from tools.chart_values import BEGIN, END, readme_with_table, table, undocumented


def test_the_charts_crd_is_identical_to_the_generated_top_level_crd(repo: Path) -> None:
    assert (CHART_DIR / "crds" / CRD_FILE_NAME).read_bytes() == (
        repo / "crds" / CRD_FILE_NAME
    ).read_bytes(), "charts/finetune-operator/crds is stale: run `make crds` and commit both copies"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"operator": {"workers": "8"}}, "/operator/workers"),
        ({"metrics": {"enabled": "yes"}}, "/metrics/enabled"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"operator": {"logFormat": "xml"}}, "/operator/logFormat"),
        ({"metrics": {"serviceMonitor": {"interval": 30}}}, "/metrics/serviceMonitor/interval"),
    ],
)
def test_values_schema_rejects_a_wrongly_typed_value_naming_it(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=f"at '{named}'"):
        render(values)


def test_values_schema_rejects_a_misspelt_key_naming_it() -> None:
    with pytest.raises(helm.HelmValuesError, match="'replicas' not allowed"):
        render({"replicas": 2})


def test_the_default_values_satisfy_the_schema() -> None:
    helm.Chart.load(CHART_DIR).validate_schema({})


def test_every_value_has_a_description_comment() -> None:
    assert undocumented() == [], "add a `# --` comment above each of these in values.yaml"


def test_the_readme_values_table_is_the_generated_one() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    assert BEGIN in readme and END in readme
    assert readme == readme_with_table(readme, table()), "run `make chart-docs` and commit the README"
