"""Data flows one way through the package folders: data → models → evaluation → training → serving → defs.

Read from the source (every import statement, also the ones inside functions), so a helper placed in the wrong
room fails here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "recsys_assets"
ORDER = ["data", "models", "evaluation", "training", "serving", "defs"]
# Third-party frameworks a layer must not import: models and training are runnable under torchrun alone.
FORBIDDEN = {
    "models": ("dagster", "pyspark"),
    "training": ("dagster", "pyspark"),
    "evaluation": ("dagster",),
    "serving": ("dagster",),
    "data": ("dagster",),
}
# The driver side of a launch is Spark's TorchDistributor by design; the processes it starts import no Spark.
ALLOWED = {"training/launch.py": ("pyspark",)}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(folder: str) -> list[str]:
    allowed = set(ORDER[: ORDER.index(folder) + 1])
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "recsys_assets" and len(parts) > 1 and parts[1] in ORDER and parts[1] not in allowed:
                found.append(f"{path.relative_to(PACKAGE)} imports {name}")
            rel = str(path.relative_to(PACKAGE))
            if parts[0] in FORBIDDEN.get(folder, ()) and parts[0] not in ALLOWED.get(rel, ()):
                found.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return found


@pytest.mark.parametrize("folder", ORDER)
def test_a_folder_imports_only_the_folders_before_it(folder):
    assert _violations(folder) == []


def test_the_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The check itself can fail: a models module importing from defs, or dagster, is reported."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text(
        "import dagster\n\n\ndef f():\n    from recsys_assets.defs.types import TrainedModel\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    assert sorted(_violations("models")) == [
        "models/bad.py imports dagster",
        "models/bad.py imports recsys_assets.defs.types",
    ]
