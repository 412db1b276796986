"""Champion/challenger: the decision rule, and both models re-scored on the same held-out set
through their real ONNX serving artifacts."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from recsys.config import load_settings
from recsys.data import product_catalog, read_relevance_csv, split_by_query
from recsys.families.search.export import build_serving_artifacts
from recsys.families.search.pipeline import compare_with_champion
from recsys.families.search.training import TrainingParams, fine_tune
from recsys.model_pipeline import should_promote
from recsys.registry import RegistryAuthError
from tests.test_registry_errors import create_mlflow_user, log_in_as


def test_should_promote_a_clear_gain_and_keep_the_champion_otherwise() -> None:
    champion = {"ndcg_at_10": 0.40, "mrr": 0.5}

    yes = should_promote({"ndcg_at_10": 0.45}, champion)
    assert yes.promote and "beats champion 0.4000 by +0.0500" in yes.reason
    tie = should_promote({"ndcg_at_10": 0.40}, champion)
    assert not tie.promote and "keeping the champion" in tie.reason
    small = should_promote({"ndcg_at_10": 0.41}, champion, min_gain=0.02)
    assert not small.promote and "min_gain 0.0200" in small.reason
    by_mrr = should_promote({"ndcg_at_10": 0.1, "mrr": 0.6}, champion, metric="mrr")
    assert by_mrr.promote
    first = should_promote({"ndcg_at_10": 0.1}, None)
    assert first.promote and "no champion" in first.reason
    with pytest.raises(KeyError, match="recall_at_10"):
        should_promote({"ndcg_at_10": 0.1}, champion, metric="recall_at_10")


@pytest.fixture(scope="module")
def run(homedepot_sample: Path, tiny_bert_dir: Path, tmp_path_factory) -> dict:
    """Held-out split files, a random-weights champion and a fine-tuned challenger."""
    root = tmp_path_factory.mktemp("promotion")
    frame = read_relevance_csv(homedepot_sample)
    split = split_by_query(frame, test_fraction=0.2, seed=13)
    catalog = product_catalog(frame)
    paths = {"test_path": str(root / "test.csv"), "catalog_path": str(root / "catalog.csv")}
    split.test.to_csv(paths["test_path"], index=False)
    catalog.to_csv(paths["catalog_path"], index=False)
    params = TrainingParams(epochs=3, batch_size=16, learning_rate=1e-3, seed=1)
    tuned = fine_tune(split.train, tiny_bert_dir, root / "ft", params).checkpoint_dir
    build = build_serving_artifacts
    return {
        "split": paths,
        "root": root,
        "champion": build(tiny_bert_dir, catalog, root / "champion", model_name="m"),
        "challenger": build(tuned, catalog, root / "challenger", model_name="m"),
    }


def test_compare_with_champion_rescores_both_on_the_same_queries(run: dict) -> None:
    settings = load_settings()
    out = compare_with_champion(
        settings,
        run["split"],
        str(run["challenger"]),
        champion_dir=str(run["champion"]),
        run_dir=run["root"],
    )

    table = {row["system"]: row for row in out["table"]}
    assert set(table) == {"challenger", "champion"}
    assert set(table["challenger"]) == set(table["champion"])
    assert out["champion_source"] == "rescored"
    gain = table["challenger"]["ndcg_at_10"] - table["champion"]["ndcg_at_10"]
    assert out["promote"] is (gain > 0.0)
    assert out["promote"], f"fine-tuning should beat random weights: {out['reason']}"
    stem = run["root"] / "evaluation" / f"champion_challenger_{settings.model_name}"
    for suffix in (".json", ".csv", ".png"):  # the table and its plot, as logged to MLflow
        assert stem.with_suffix(suffix).stat().st_size > 0, suffix

    same = compare_with_champion(
        settings, run["split"], str(run["champion"]), champion_dir=str(run["champion"])
    )
    assert not same["promote"] and "gain +0.0000" in same["reason"]


def test_champion_gate_fails_when_the_registry_refuses_instead_of_promoting(
    run: dict, mlflow_server: str, monkeypatch
) -> None:
    """ "No champion" promotes only when the registry says the model has none; a registry that
    refuses the lookup (a login without permission) fails the gate, never promotes unseen."""
    settings = dataclasses.replace(
        load_settings(), mlflow_tracking_uri=mlflow_server, model_name=f"gate_{uuid.uuid4().hex}"
    )
    # The challenger's metrics, as the export hands them over.
    metrics = {"ndcg_at_10": 0.3, "mrr": 0.4, "recall_at_10": 0.5, "recall_at_100": 0.9}
    first = compare_with_champion(
        settings, run["split"], str(run["challenger"]), challenger_metrics=metrics
    )
    assert first["promote"] and first["champion_source"] == "none"
    assert "no champion" in first["reason"]

    log_in_as(monkeypatch, create_mlflow_user(mlflow_server))
    with pytest.raises(RegistryAuthError, match="PERMISSION_DENIED"):
        compare_with_champion(
            settings, run["split"], str(run["challenger"]), challenger_metrics=metrics
        )
