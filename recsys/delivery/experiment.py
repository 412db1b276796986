"""Record a finished rollout in MLflow: one run per rollout, and tags on both versions.

A shop reads an A/B test's outcome where it reads every model's history, so the per-arm result
(click-through with intervals, the test, the decision) and the per-version health over the whole
rollout become an MLflow run in the ``rollouts`` experiment, tagged with the model, the rollout
id and the decision; each registry version involved gets ``rollout_<kind>_run_id`` and a short
``rollout_<kind>_result`` tag, so the version's page in the MLflow UI links to the evidence.
"""

from __future__ import annotations

import json
import math
from typing import Any

from recsys.config import Settings

EXPERIMENT = "rollouts"


def _flat_health(totals: dict[str, Any] | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for arm, stats in (totals or {}).items():
        for name in ("requests", "failures", "error_rate", "mean_latency_ms", "p99_latency_ms"):
            value = (stats or {}).get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"{arm}_{name}"] = float(value)
    return metrics


def log_rollout(settings: Settings, result: dict[str, Any], policy: dict[str, Any]) -> str:
    """Log the analysis ``result`` of a finished rollout (see
    :class:`recsys.delivery.analysis.RolloutAnalysis`) as an MLflow run; return its id."""
    from recsys import registry

    uri = settings.mlflow_tracking_uri
    client = registry.client(uri)
    model = settings.model_name
    with registry.registry_request(uri, f"logging rollout {result['rollout_id']}"):
        run = client.create_run(
            registry.ensure_experiment(client, EXPERIMENT),
            run_name=f"{result['mode']} {model} v{result['candidate']} vs v{result['stable']}",
            tags={
                "model": model,
                "rollout_id": str(result["rollout_id"]),
                "mode": str(result["mode"]),
                "decision": str(result["decision"]),
                "mlflow.note.content": "\n".join(result.get("reasons") or []),
            },
        )
        run_id = run.info.run_id
        params = {
            "stable_version": result["stable"],
            "candidate_version": result["candidate"],
            **{f"policy_{k}": json.dumps(v) for k, v in policy.items()},
        }
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:500])
        comparison = result.get("comparison")
        metrics = _flat_health(result.get("totals"))
        metrics.update(result.get("comparison_metrics") or {})
        shadow = result.get("shadow") or {}
        for key, value in shadow.items():
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"shadow_{key}"] = float(value)
        metrics["seconds"] = float(result.get("seconds") or 0.0)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.log_dict(run_id, result, "rollout_result.json")
    summary = (comparison or {}).get("summary") or "; ".join(result.get("reasons") or [])
    mode = result["mode"]
    for version in (result["stable"], result["candidate"]):
        registry.set_version_tags(uri, model, version, {
            f"rollout_{mode}_run_id": run_id,
            f"rollout_{mode}_result": f"{result['decision']}: {summary}",
        })  # fmt: skip
    return run_id
