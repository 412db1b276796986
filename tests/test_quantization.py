"""INT8 export: size, agreement with fp32, the quality gate, the pipeline's precision choice, and
Triton serving the INT8 encoder the manifest names (real onnxruntime, ranx and tritonserver)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.families.search.client import search
from recsys.families.search.evaluation import evaluate_encoder, onnx_embedder
from recsys.families.search.export import build_serving_artifacts
from recsys.families.search.pipeline import export_model, read_split_frame
from recsys.families.search.promotion import evaluate_serving_artifacts
from recsys.families.search.quantization import (
    INT8_ONNX_FILE,
    QuantizationRejectedError,
    choose_precision,
    embedding_agreement,
    quantization_gate,
    quantize_encoder,
)
from recsys.triton.control import TritonControl
from recsys.triton.repository import (
    UnsafePathError,
    publish_version,
    validate_artifacts,
    version_serving_config,
)
from tests.triton_testing import (
    CATALOG,
    build_test_serving_artifacts,
    copy_artifacts,
    running_triton,
)


@pytest.fixture(scope="module")
def artifacts(tiny_bert_dir: Path, frames, tmp_path_factory) -> Path:
    _, catalog = frames
    out = tmp_path_factory.mktemp("quant") / "serving"
    return build_serving_artifacts(tiny_bert_dir, catalog, out, model_name="product_search")


def test_int8_encoder_is_smaller_and_agrees_with_fp32(artifacts: Path, frames) -> None:
    test, catalog = frames
    int8 = quantize_encoder(artifacts / "encoder.onnx")

    assert int8 == artifacts / INT8_ONNX_FILE
    assert int8.stat().st_size < 0.6 * (artifacts / "encoder.onnx").stat().st_size
    probes = catalog["product_title"].tolist()[:32] + test["search_term"].tolist()[:32]
    agreement = embedding_agreement(
        artifacts / "encoder.onnx", int8, artifacts / "tokenizer.json", probes
    )
    assert agreement["min_cosine"] > 0.9
    assert agreement["min_cosine"] <= agreement["mean_cosine"] <= 1.0 + 1e-6


def test_onnx_and_torch_encoders_score_the_same_through_one_metric_path(
    tiny_bert_dir: Path, artifacts: Path, frames
) -> None:
    test, catalog = frames
    torch_result = evaluate_encoder(tiny_bert_dir, test, catalog)
    onnx_result = evaluate_serving_artifacts(artifacts, test, catalog)

    assert set(onnx_result.metrics) == set(torch_result.metrics)
    assert onnx_result.metrics == pytest.approx(torch_result.metrics, abs=1e-3)
    embed = onnx_embedder(artifacts / "encoder.onnx", artifacts / "tokenizer.json")
    vectors = embed(["angle bracket", "cordless drill"])
    assert vectors.shape == (2, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_gate_accepts_a_small_drop_and_rejects_a_large_one() -> None:
    assert quantization_gate(0.50, 0.495, max_drop=0.01) == pytest.approx(0.005)
    assert quantization_gate(0.50, 0.52, max_drop=0.0) == pytest.approx(-0.02)
    with pytest.raises(QuantizationRejectedError, match=r"drops 0\.1000 > allowed 0\.0100"):
        quantization_gate(0.50, 0.40, max_drop=0.01)

    assert choose_precision("auto", 0.50, 0.40, 0.01)[0] == "fp32"
    assert choose_precision("auto", 0.50, 0.499, 0.01)[0] == "int8"
    assert choose_precision("fp32", 0.50, None, 0.01) == ("fp32", "fp32 requested")
    with pytest.raises(QuantizationRejectedError, match="INT8 encoder rejected"):
        choose_precision("int8", 0.50, 0.40, 0.01)
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp16", 0.5, 0.5, 0.01)


def test_export_records_both_precisions_and_serves_the_chosen_one(
    tiny_bert_dir: Path, split_files: dict[str, str], tmp_path: Path
) -> None:
    split = split_files

    out = export_model(
        split,
        str(tiny_bert_dir),
        tmp_path,
        "product_search",
        None,
        precision="int8",
        max_ndcg_drop=1.0,
    )

    manifest = json.loads((Path(out["artifacts_dir"]) / "manifest.json").read_text())
    assert out["precision"] == manifest["precision"] == "int8"
    assert manifest["onnx_file"] == INT8_ONNX_FILE
    record = manifest["quantization"]
    assert 0.0 <= record["fp32_ndcg_at_10"] <= 1.0 and 0.0 <= record["int8_ndcg_at_10"] <= 1.0
    assert record["min_cosine"] > 0.9 and record["int8_bytes"] < record["fp32_bytes"]
    assert validate_artifacts(Path(out["artifacts_dir"]))["onnx_file"] == INT8_ONNX_FILE
    # The export hands the champion gate the served folder's own scores, not the fp32 ones.
    assert out["metrics"]["ndcg_at_10"] == record["int8_ndcg_at_10"]
    assert (
        out["metrics"]
        == evaluate_serving_artifacts(
            Path(out["artifacts_dir"]),
            read_split_frame(split["test_path"]),
            read_split_frame(split["catalog_path"]),
        ).metrics
    )


def test_manifest_cannot_point_the_server_outside_the_version(artifacts: Path, tmp_path) -> None:
    bad = copy_artifacts(artifacts, tmp_path / "bad", onnx_file="../../elsewhere.onnx")
    with pytest.raises(UnsafePathError, match="plain"):
        validate_artifacts(bad)


def test_triton_serves_the_int8_encoder_with_configured_knobs(tmp_path: Path) -> None:
    healthy = build_test_serving_artifacts(tmp_path / "healthy")
    quantize_encoder(healthy / "encoder.onnx")
    int8 = copy_artifacts(healthy, tmp_path / "int8", onnx_file=INT8_ONNX_FILE, precision="int8")
    (int8 / "encoder.onnx").unlink()  # prove the server reads the file the manifest names...
    (int8 / "encoder.onnx").write_bytes(b"not an onnx graph")  # ...and never this one
    knobs = {"max_batch_size": 4, "instance_count": 2, "response_cache": True}

    with running_triton(tmp_path / "triton") as triton:
        version_dir = publish_version(triton.repo, "search_int8", 1, int8, serving=knobs)
        assert (version_dir / INT8_ONNX_FILE).is_file()
        config = version_serving_config(triton.repo, "search_int8", 1)
        assert config["response_cache"] == {"enable": True}
        assert config["max_batch_size"] == 4 and config["instance_group"][0]["count"] == 2
        with TritonControl(triton.grpc_url, timeout_s=30) as control:
            control.load_version("search_int8", 1, triton.repo, config=config)
            loaded = control.model_config("search_int8")
            assert loaded["response_cache"]["enable"] is True
            assert loaded["instance_group"][0]["count"] == 2
            assert "dynamic_batching" in loaded
            hits = search(control, "search_int8", CATALOG["100003"], top_k=3)
    assert hits[0][0] == "100003"
    assert hits[0][1] > 0.95
