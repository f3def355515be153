"""The import rule of DESIGN.md: model/ is pure PyTorch; flows/ holds no torch; only tasks/ talks to services."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"prefect", "ray", "mlflow", "label_studio_sdk", "prefect_ray"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "model").rglob("*.py")), ids=lambda p: p.name)
def test_model_is_pure_pytorch(path):
    forbidden = imported_modules(path) & (SERVICES | {"tasks", "flows"})
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}; model/ must stay pure PyTorch"


@pytest.mark.parametrize("path", sorted((ROOT / "flows").rglob("*.py")), ids=lambda p: p.name)
def test_flows_hold_no_torch(path):
    forbidden = imported_modules(path) & {"torch", "label_studio_sdk"}
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}; flows/ read like a recipe"


def test_rule_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom mlflow.tracking import MlflowClient\nimport ray.train as rt\n")
    assert imported_modules(bad) == {"torch", "mlflow", "ray"}
