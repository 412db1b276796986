"""Fine-tuning, evaluation and ONNX export on the tiny offline BERT."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from recsys.data import product_catalog, read_relevance_csv, split_by_query
from recsys.families.search.encoder import (
    BiEncoder,
    encode_texts,
    load_tokenizer,
    resolve_base_model,
)
from recsys.families.search.evaluation import _ranx_metrics, evaluate_encoder, relevance_grade
from recsys.families.search.export import build_serving_artifacts
from recsys.families.search.training import TrainingParams, fine_tune, positive_pairs


@pytest.fixture(scope="module")
def split(homedepot_sample):
    return split_by_query(read_relevance_csv(homedepot_sample), test_fraction=0.2, seed=13)


@pytest.fixture(scope="module")
def fine_tuned(tiny_bert_dir, split, tmp_path_factory):
    params = TrainingParams(epochs=3, batch_size=16, learning_rate=1e-3, seed=1)
    return fine_tune(split.train, tiny_bert_dir, tmp_path_factory.mktemp("ft"), params)


def test_fine_tuning_lowers_the_in_batch_loss(fine_tuned, split):
    assert fine_tuned.steps > 0
    assert fine_tuned.pairs == len(positive_pairs(split.train, 2.33))
    assert fine_tuned.device == "cpu" and not fine_tuned.mixed_precision
    assert fine_tuned.epoch_losses[-1] < fine_tuned.epoch_losses[0]
    assert (fine_tuned.checkpoint_dir / "config.json").is_file()
    assert (fine_tuned.checkpoint_dir / "tokenizer.json").is_file()


def test_too_few_positive_pairs_is_refused(tiny_bert_dir, split, tmp_path):
    with pytest.raises(ValueError, match="training pair"):
        fine_tune(split.train.head(1), tiny_bert_dir, tmp_path, TrainingParams())


def test_relevance_grades_span_zero_to_six():
    assert [relevance_grade(r) for r in (1, 1.33, 1.67, 2, 2.33, 2.67, 3)] == [0, 1, 2, 3, 4, 5, 6]


def test_ranking_metrics_are_one_for_a_perfect_ranker():
    import pandas as pd

    test = pd.DataFrame(
        {
            "search_term": ["a", "a", "b"],
            "product_uid": ["1", "2", "3"],
            "relevance": [3.0, 1.0, 2.67],
        }
    )
    products = np.eye(3, dtype=np.float32)
    queries = np.stack([products[0], products[2]])
    metrics = _ranx_metrics(test, ["a", "b"], queries, ["1", "2", "3"], products, 4, (10, 100))
    assert metrics == pytest.approx(
        {"ndcg_at_10": 1.0, "mrr": 1.0, "recall_at_10": 1.0, "recall_at_100": 1.0}
    )


def test_evaluation_reports_ranking_and_classification_metrics(fine_tuned, split, homedepot_sample):
    catalog = product_catalog(read_relevance_csv(homedepot_sample))
    result = evaluate_encoder(fine_tuned.checkpoint_dir, split.test, catalog)
    expected = {"ndcg_at_10", "mrr", "recall_at_10", "recall_at_100", "precision", "recall", "f1"}
    expected |= {"accuracy", "score_threshold", "positive_rate"}
    expected |= {f"majority_{key}" for key in ("precision", "recall", "f1", "accuracy")}
    assert set(result.metrics) == expected
    assert all(0.0 <= v <= 1.0 for k, v in result.metrics.items() if k != "score_threshold")
    assert result.queries == split.test["search_term"].nunique()
    assert result.metrics["recall_at_100"] >= result.metrics["recall_at_10"]


def test_onnx_export_reproduces_pytorch_and_writes_manifest(fine_tuned, homedepot_sample, tmp_path):
    catalog = product_catalog(read_relevance_csv(homedepot_sample))
    out = build_serving_artifacts(
        fine_tuned.checkpoint_dir, catalog, tmp_path / "serving", model_name="product_search"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx_inputs"] == ["input_ids", "attention_mask"]
    assert manifest["products"] == len(catalog)
    assert manifest["onnx_worst_cosine"] > 0.999
    products = np.load(out / "products.npz")
    assert list(products["ids"]) == catalog["product_uid"].tolist()
    assert np.allclose(np.linalg.norm(products["embeddings"], axis=1), 1.0, atol=1e-4)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(["angle bracket", "cordless drill with battery"])
    feeds = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
    session = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, feeds)[0]
    model = BiEncoder.from_pretrained(fine_tuned.checkpoint_dir)
    reference = encode_texts(
        model,
        load_tokenizer(fine_tuned.checkpoint_dir),
        ["angle bracket", "cordless drill with battery"],
    ).numpy()
    assert np.allclose(served, reference, atol=1e-4)


def test_base_model_resolution(tiny_bert_dir, tmp_path):
    minilm = resolve_base_model("minilm")
    assert (minilm / "config.json").is_file() and (minilm / "tokenizer.json").is_file()
    assert resolve_base_model(str(tiny_bert_dir)) == tiny_bert_dir
    with pytest.raises(FileNotFoundError, match="neither 'minilm' nor a folder"):
        resolve_base_model(str(tmp_path / "nothing-here"))
