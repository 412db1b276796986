"""The family interface: the platform finds families by folder and never imports one.

The design test of issue #11: a third family is a new folder (here a toy family added to the
``recsys.families`` package path for the test), and no platform module imports a family
package or a search-only module, so deleting ``families/search`` would break no platform code.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

import recsys.families as families
from recsys.families import UnknownFamilyError, available, get_family

ROOT = Path(__file__).resolve().parent.parent / "recsys"
PLATFORM = [
    "registry.py",
    "deploy.py",
    "rollback.py",
    "audit.py",
    "alerts.py",
    "locking.py",
    "statefile.py",
    "model_pipeline.py",
    "tables.py",
    "scheduling.py",
    "credentials.py",
    "config.py",
    "assets.py",
    "triton/control.py",
    "triton/repository.py",
    "triton/server.py",
    *(f"monitoring/{p.name}" for p in (ROOT / "monitoring").glob("*.py")),
]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_both_families_are_found_by_name_and_unknown_ones_are_refused() -> None:
    assert {"search", "recommend"} <= set(available())
    assert get_family("recommend").name == "recommend"
    assert get_family("search").gate_metric == "ndcg_at_10"
    with pytest.raises(UnknownFamilyError, match=r"installed: .*recommend.*search"):
        get_family("audio")
    with pytest.raises(UnknownFamilyError):
        get_family("../search")


@pytest.mark.parametrize("module", PLATFORM)
def test_platform_modules_import_no_family(module: str) -> None:
    packages = set(available())
    for name in _imports(ROOT / module):
        if name.startswith("recsys.families."):
            assert name.split(".")[2] not in packages, f"{module} imports {name}"


TOY_FAMILY = """
from pathlib import Path

from recsys.families.base import ModelFamily


class ToyFamily(ModelFamily):
    name = "toy"
    default_model_name = "toy_model"
    required_artifacts = ("weights.onnx", "manifest.json")
    serving_model_source = Path(__file__).with_name("serving_model.py")
    gate_metric = "accuracy"

    def triton_io(self):
        return (
            [{"name": "X", "data_type": "TYPE_FP32", "dims": [3]}],
            [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}],
        )

    def registry_onnx_file(self, manifest):
        return "weights.onnx"

    def smoke_test(self, control, model_name, version, manifest, request=None):
        return []


FAMILY = ToyFamily()
"""


def test_a_third_family_is_a_new_folder(tmp_path: Path, monkeypatch) -> None:
    """A family package on the ``recsys.families`` path is found, and the platform's
    repository publishes its version folders with its files, model and Triton config, and
    the monitor and drift DAG factories name its DAGs, with no edit anywhere else."""
    from recsys.families import drift_dag_id, monitor_dag_id, served_models
    from recsys.triton.repository import (
        IncompleteArtifactsError,
        publish_version,
        verify_version_dir,
        version_serving_config,
    )

    package = tmp_path / "toy"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(TOY_FAMILY))
    (package / "serving_model.py").write_text("# the toy's python-backend model\n")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    get_family.cache_clear()
    try:
        assert "toy" in available() and get_family("toy").default_model_name == "toy_model"
        assert served_models()["toy"] == ("",)
        assert monitor_dag_id("toy", "") == "triton_monitor_toy"
        assert drift_dag_id("toy") == "input_drift_toy"

        artifacts = tmp_path / "artifacts"
        artifacts.mkdir()
        (artifacts / "manifest.json").write_text(json.dumps({"family": "toy"}))
        with pytest.raises(IncompleteArtifactsError, match=r"missing weights\.onnx"):
            publish_version(tmp_path / "repo", "toy_model", 1, artifacts)
        (artifacts / "weights.onnx").write_bytes(b"not really onnx")
        folder = publish_version(tmp_path / "repo", "toy_model", 1, artifacts)
        assert verify_version_dir(folder)["family"] == "toy"
        assert (folder / "model.py").read_text() == "# the toy's python-backend model\n"
        config = version_serving_config(tmp_path / "repo", "toy_model", 1)
        assert [i["name"] for i in config["input"]] == ["X"]
        assert "Y" in (tmp_path / "repo" / "toy_model" / "config.pbtxt").read_text()

        (artifacts / "manifest.json").write_text(json.dumps({"family": "audio"}))
        with pytest.raises(IncompleteArtifactsError, match="unknown model family 'audio'"):
            publish_version(tmp_path / "repo", "toy_model", 2, artifacts)
    finally:
        get_family.cache_clear()
