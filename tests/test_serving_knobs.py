"""Serving knobs (instances, batching, queue delay, threads) are first-class settings: the
platform serves what the serving benchmark measured, and settings, CLI flags and pipeline params
reach the Triton config of the version they publish."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from recsys.audit import read_records
from recsys.cli import main
from recsys.config import SERVING_ENV, load_settings
from recsys.triton.control import TritonControl
from recsys.triton.repository import (
    CONFIG_FILE,
    ServingKnobsConflictError,
    default_serving,
    serving_config,
)
from tests.conftest import PROJECT_ROOT
from tests.triton_testing import register_version

SMOKE = {"query": "angle bracket", "top_k": 5}
BENCHMARK = PROJECT_ROOT / "benchmarks" / "serving_throughput.py"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "serving_throughput.json"


def _benchmark():
    """``benchmarks/serving_throughput.py`` as a module (the folder is no package)."""
    name = "serving_throughput_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def no_serving_env(monkeypatch):
    """The platform's own defaults: no ``RECSYS_TRITON_*`` knob override (the suite sets one
    instance to keep its many deploys fast)."""
    for variable in SERVING_ENV:
        monkeypatch.delenv(variable, raising=False)


def _loaded_knobs(config: dict) -> dict:
    """The knobs of a Triton config (as Triton reports it, or as ``serving_config`` builds it)."""
    batching = config.get("dynamic_batching")
    knobs = {
        "instance_count": int(config["instance_group"][0]["count"]),
        "max_batch_size": int(config["max_batch_size"]),
        "dynamic_batching": batching is not None,
        "intra_op_threads": int(config["parameters"]["intra_op_threads"]["string_value"]),
    }
    if batching is not None:
        knobs["max_queue_delay_us"] = int(batching.get("max_queue_delay_microseconds", 0))
    return knobs


def _pbtxt_knobs(path) -> dict:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return _loaded_knobs(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _expected(knobs: dict) -> dict:
    """What a config built from ``knobs`` shows (no queue delay without dynamic batching)."""
    expected = {k: knobs[k] for k in ("instance_count", "max_batch_size", "intra_op_threads")}
    expected["dynamic_batching"] = knobs["dynamic_batching"]
    if knobs["dynamic_batching"]:
        expected["max_queue_delay_us"] = knobs["max_queue_delay_us"]
    return expected


# -- defaults: one place, the benchmarked ones ---------------------------------------------


def test_the_platform_defaults_are_what_the_serving_benchmark_measures(no_serving_env):
    bench = _benchmark()
    args = bench.parse_args([])
    assert bench.requested_knobs(args) == {}
    defaults = default_serving()
    assert bench.serving_knobs(args) == defaults == load_settings().serving_knobs()
    assert defaults["max_batch_size"] == 32 and defaults["dynamic_batching"] is True
    assert defaults["max_queue_delay_us"] == 2000 and defaults["intra_op_threads"] == 1
    assert defaults["response_cache"] is False

    # The published results were measured with the defaults of the machine they ran on.
    record = json.loads(RESULTS.read_text())
    measured = default_serving(cpus=record["machine"]["cpu_count"])
    assert {k: record["triton"][k] for k in measured} == measured
    assert measured["instance_count"] == 2  # the 2-CPU machine of the README's table

    # The pipelines' serving params default to the same knobs.
    from recsys.model_pipeline import serving_from_params, serving_params

    params = serving_params()
    assert {k: spec["default"] for k, spec in params.items()} == {k: defaults[k] for k in params}
    assert serving_from_params({"seed": 1}) is None
    assert serving_from_params({"instance_count": 3, "max_batch_size": None}) == {
        "instance_count": 3
    }
    # A platform deploy never falls back on serving_config's defaults (unpinned versions only).
    assert _loaded_knobs(serving_config("m", **defaults)) == _expected(defaults)


def test_environment_overrides_the_defaults_and_bad_values_are_named(monkeypatch, no_serving_env):
    monkeypatch.setenv("RECSYS_TRITON_INSTANCES", "3")
    monkeypatch.setenv("RECSYS_TRITON_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("RECSYS_TRITON_DYNAMIC_BATCHING", "false")
    monkeypatch.setenv("RECSYS_TRITON_MAX_QUEUE_DELAY_US", "500")
    monkeypatch.setenv("RECSYS_TRITON_INTRA_OP_THREADS", "2")
    settings = load_settings()
    assert settings.serving_knobs() == {
        "instance_count": 3,
        "max_batch_size": 16,
        "dynamic_batching": False,
        "max_queue_delay_us": 500,
        "intra_op_threads": 2,
        "response_cache": False,
    }
    # What a deploy is given wins; None means "not given".
    knobs = settings.serving_knobs({"max_batch_size": 4, "instance_count": None})
    assert knobs["max_batch_size"] == 4 and knobs["instance_count"] == 3
    bench = _benchmark()
    assert bench.serving_knobs(bench.parse_args(["--max-batch-size", "8"]))["max_batch_size"] == 8
    with pytest.raises(ValueError, match="unknown serving option"):
        settings.serving_knobs({"instances": 2})
    with pytest.raises(ValueError, match="max_batch_size must be a whole number 1-1024"):
        settings.serving_knobs({"max_batch_size": 0})
    with pytest.raises(ValueError, match="dynamic_batching must be true or false"):
        settings.serving_knobs({"dynamic_batching": "yes"})
    for variable, bad, said in (
        ("RECSYS_TRITON_MAX_BATCH_SIZE", "lots", "a whole number 1-1024"),
        ("RECSYS_TRITON_INTRA_OP_THREADS", "0", "a whole number 1-64"),
        ("RECSYS_TRITON_DYNAMIC_BATCHING", "maybe", "true or false"),
    ):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ValueError, match=f"{variable} must be {said}"):
            load_settings()
        monkeypatch.delenv(variable)


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        (["--instances", "0"], "instance_count must be a whole number 1-64, got 0"),
        (["--max-batch-size", "two"], "expected a whole number, got 'two'"),
        (["--intra-op-threads", "65"], "intra_op_threads must be a whole number 1-64"),
    ],
)
def test_bad_serving_flags_exit_2_naming_the_value(flag, named, capsys):
    with pytest.raises(SystemExit) as parse_error:
        main(["deploy", "--version", "1", *flag])
    assert parse_error.value.code == 2
    assert named in capsys.readouterr().err


# -- knobs reach Triton through the platform's deploy paths ----------------------------------


def test_pipeline_deploys_pin_their_knobs_into_the_config_triton_loads(platform, search_artifacts):
    """``deploy_or_roll_out`` (the pipelines' deploy): the platform's knobs by default, a run's
    serving params, or an explicit ``serving`` dict end up in the version's manifest, the
    model's config.pbtxt, what Triton loads, the audit record and the result; a redeploy that
    asks an already-published version for other knobs is refused before Triton is touched."""
    from recsys.deploy import deploy_model
    from recsys.model_pipeline import deploy_or_roll_out

    model, repo = platform.model_name, platform.triton_repo
    control = TritonControl(platform.triton_grpc_url)

    def check(version: int, deployed: dict, knobs: dict) -> None:
        assert deployed["serving"] == knobs
        manifest = json.loads((repo / model / str(version) / "manifest.json").read_text())
        assert manifest["serving"] == knobs
        assert _pbtxt_knobs(repo / model / CONFIG_FILE) == _expected(knobs)
        assert _loaded_knobs(control.model_config(model)) == _expected(knobs)
        record = read_records(platform.audit_log, model)[-1]
        assert record["action"] == "deploy" and record["version"] == version
        assert record["serving"] == knobs

    # Defaults: the benchmarked knobs (the suite's RECSYS_TRITON_INSTANCES=1 aside).
    first = search_artifacts("first")
    v1 = register_version(platform, first)
    deployed = deploy_or_roll_out(platform, v1, str(first), {}, SMOKE, "first")
    defaults = {**default_serving(), "instance_count": 1}
    assert platform.serving_knobs() == defaults
    check(v1, deployed, defaults)

    # The run's params (what the DAGs pass as ``values``).
    second = search_artifacts("second")
    v2 = register_version(platform, second)
    values = {"rollout": "all_at_once", "max_batch_size": 8, "max_queue_delay_us": 500}
    deployed = deploy_or_roll_out(platform, v2, str(second), values, SMOKE, "params")
    check(v2, deployed, {**defaults, "max_batch_size": 8, "max_queue_delay_us": 500})

    # An explicit serving dict (wins over the params).
    third = search_artifacts("third")
    v3 = register_version(platform, third)
    serving = {
        "instance_count": 2,
        "max_batch_size": 4,
        "dynamic_batching": False,
        "intra_op_threads": 2,
    }
    deployed = deploy_or_roll_out(
        platform, v3, str(third), values, SMOKE, "explicit", serving=serving
    )
    knobs = {**defaults, **serving}
    check(v3, deployed, knobs)
    assert control.loaded_versions(model) == [v3]

    # Versions are immutable: other knobs for a published version are refused, nothing moves.
    with pytest.raises(ServingKnobsConflictError, match=r"instance_count=3 \(published with 2\)"):
        deploy_model(platform, v3, None, SMOKE, {"instance_count": 3})
    with pytest.raises(ServingKnobsConflictError, match=r"max_batch_size=32 \(published with 8\)"):
        deploy_model(platform, v2, str(second), SMOKE, {"max_batch_size": 32})
    assert control.loaded_versions(model) == [v3]
    assert read_records(platform.audit_log, model)[-1]["version"] == v3
    # The same knobs (or none) redeploy it as published.
    assert (
        deploy_model(platform, v2, None, SMOKE, {"max_batch_size": 8})["serving"]["max_batch_size"]
        == 8
    )
    assert _loaded_knobs(control.model_config(model))["max_batch_size"] == 8


def test_recsys_deploy_flags_reach_the_config_triton_loads(platform, search_artifacts, capsys):
    """``recsys deploy --instances/--max-batch-size/--no-dynamic-batching/--intra-op-threads``
    on a version rebuilt from MLflow: the flags are pinned at publish, Triton loads them, the
    command says so; asking the published version for other knobs exits 2."""
    artifacts = search_artifacts("cli")
    version = register_version(platform, artifacts)  # registered only: no version folder yet
    argv = ["deploy", "--version", str(version), "--instances", "2", "--max-batch-size", "16",
            "--no-dynamic-batching", "--intra-op-threads", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rebuilt from MLflow" in out
    assert "serving: 2 instance(s) x 2 ONNX Runtime thread(s), no dynamic batching" in out
    loaded = TritonControl(platform.triton_grpc_url).model_config(platform.model_name)
    assert _loaded_knobs(loaded) == {
        "instance_count": 2,
        "max_batch_size": 16,
        "dynamic_batching": False,
        "intra_op_threads": 2,
    }
    assert read_records(platform.audit_log, platform.model_name)[-1]["serving"] == {
        **platform.serving_knobs(),
        "instance_count": 2,
        "max_batch_size": 16,
        "dynamic_batching": False,
        "intra_op_threads": 2,
    }

    assert main(["deploy", "--version", str(version), "--instances", "3"]) == 2
    assert "instance_count=3 (published with 2)" in capsys.readouterr().err
    assert main(["deploy", "--version", str(version), "--instances", "2"]) == 0
    assert f"v{version} loaded" in capsys.readouterr().out
