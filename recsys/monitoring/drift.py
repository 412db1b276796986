"""Online query drift: are people searching for what the served model was trained on?

:func:`check_query_drift` reads the queries Triton's model sampled for the serving version since
the last check (:mod:`recsys.monitoring.query_samples`), measures them with that version's own
tokenizer and encoder, and judges them against the version's training reference
(``query_reference.json`` in its folder; :mod:`recsys.monitoring.drift_policy` says how). The
``query_drift`` DAG runs it hourly, alerts and audits a drift (:func:`record_drift`) and, when
asked to, requests retraining through an Airflow Asset (:func:`record_retraining_request`).

What the check remembers lives in a small JSON file (``Settings.drift_state``), written
atomically under a lock like the metrics monitor's state: per model and version, the byte
offset read in each sample file, and when retraining was last requested (for the cooldown).
Samples are consumed only by a judgement: too few, or a version without a reference, leaves
them for the next check, so a quiet model is judged once enough traffic has accumulated.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from recsys.config import Settings
from recsys.monitoring.drift_policy import DriftThresholds, drift_reasons, drift_stats
from recsys.monitoring.drift_reference import (
    QUERY_REFERENCE_FILE,
    QueryReference,
)
from recsys.statefile import read_json_state, state_lock, write_json_atomically

log = logging.getLogger(__name__)

DRIFT = "query_drift"
RETRAINING_REQUESTED = "retraining_requested"
_STATE_FORMAT = 1


# -- state ------------------------------------------------------------------------------------


def _drift_state(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT:
        raise ValueError("not a drift state record")
    if not isinstance(data.get("models"), dict):
        raise ValueError("no 'models' mapping")
    return data


def _load_state(path: Path) -> dict[str, Any]:
    """The state file's content; missing or corrupt (logged) is a fresh start, since the worst
    that costs is reading some samples twice."""
    state, _ = read_json_state(path, _drift_state, "drift state")
    return state if state is not None else {"format": _STATE_FORMAT, "models": {}}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    write_json_atomically(path, state)


def _locked(path: Path):
    return state_lock(path, 120.0, "drift state")


# -- which version ----------------------------------------------------------------------------


def serving_version(settings: Settings, model: str) -> int | None:
    """The version Triton serves (the newest, if several), else the registry's champion when
    Triton cannot be asked; ``None`` when nothing serves. Raises the Triton error when neither
    can be reached."""
    from recsys.triton.control import TritonControl, TritonUnavailableError

    try:
        with TritonControl(settings.triton_grpc_url) as control:
            versions = control.loaded_versions(model)
        return versions[-1] if versions else None
    except TritonUnavailableError as exc:
        from recsys import registry

        try:
            return registry.alias_version(settings.mlflow_tracking_uri, model, registry.CHAMPION)
        except Exception:
            raise exc from None


# -- the check --------------------------------------------------------------------------------


def _verdict(model: str, version: int | None, reasons: list[str], **fields: Any) -> dict[str, Any]:
    verdict = {
        "model": model,
        "version": version,
        "checked_at": time.time(),
        "judged": False,
        "drift": False,
        "retrain_due": False,
        "reasons": reasons,
        "stats": None,
        "queries": 0,
    }
    verdict.update(fields)
    return verdict


def check_query_drift(
    settings: Settings,
    model: str | None = None,
    version: int | None = None,
    thresholds: DriftThresholds | None = None,
    *,
    commit: bool = True,
) -> dict[str, Any]:
    """Judge the queries sampled for ``model`` (default: the platform's) ``version`` (default:
    the serving one, see :func:`serving_version`) since the last committed check.

    Returns a JSON-safe verdict: ``judged`` (False with too few queries, no reference, or no
    serving version, the ``reasons`` say which), ``drift``, ``retrain_due`` (drift and no
    retraining requested within the cooldown), ``reasons``, ``stats``, ``queries`` and the
    sample window (``first_ts`` / ``last_ts``). With ``commit`` (the DAG) a judged sample is
    consumed; without (``recsys drift``) the check only looks.

    ``thresholds`` default to :func:`recsys.monitoring.config.load_drift_thresholds`.
    """
    from recsys.monitoring.config import load_drift_thresholds
    from recsys.monitoring.query_features import QueryFeaturizer, query_embeddings
    from recsys.monitoring.query_samples import read_new_samples, version_sample_dir

    model = model or settings.model_name
    thresholds = thresholds or load_drift_thresholds(model)
    if version is None:
        version = serving_version(settings, model)
    if version is None:
        return _verdict(model, None, [f"{model}: no version serves; nothing to judge"])
    version_dir = settings.triton_repo / model / str(version)
    reference_path = version_dir / QUERY_REFERENCE_FILE
    if not reference_path.is_file():
        return _verdict(
            model,
            version,
            [
                f"{model} v{version} has no {QUERY_REFERENCE_FILE} (published before drift "
                "references, or exported without training queries); no judgement"
            ],
        )
    reference = QueryReference.load(reference_path)
    reference.check_encoder(version_dir)

    state_path = settings.drift_state
    with _locked(state_path):
        state = _load_state(state_path)
        entry = state["models"].setdefault(model, {})
        offsets = entry.setdefault("offsets", {}).get(str(version), {})
        read = read_new_samples(
            version_sample_dir(settings.query_sample_dir, model, version), offsets
        )
        window = {"first_ts": read.first_ts, "last_ts": read.last_ts, "bad_lines": read.bad_lines}
        if len(read.queries) < thresholds.min_queries:
            return _verdict(
                model,
                version,
                [
                    f"only {len(read.queries)} sampled queries for {model} v{version} since the "
                    f"last check (< min_queries {thresholds.min_queries}): too few to judge; "
                    "they are kept for the next check"
                ],
                queries=len(read.queries),
                **window,
            )
        queries = read.queries
        if len(queries) > thresholds.max_queries:
            queries = random.Random(0).sample(queries, thresholds.max_queries)
        features = QueryFeaturizer(version_dir / "tokenizer.json").features(queries)
        embeddings = query_embeddings(version_dir, queries, reference.max_query_tokens)
        stats = drift_stats(reference, features, embeddings)
        reasons = drift_reasons(stats, thresholds)
        drift = bool(reasons)
        last_request = entry.get("last_retraining_request_at")
        cooling = (
            last_request is not None
            and time.time() - float(last_request) < thresholds.retrain_cooldown_hours * 3600
        )
        if drift and cooling:
            reasons.append(
                "retraining was already requested "
                f"{(time.time() - float(last_request)) / 3600:.1f} h ago (cooldown "
                f"{thresholds.retrain_cooldown_hours:g} h): alerting only"
            )
        if not drift:
            reasons.append(
                f"{len(read.queries)} sampled queries look like the training queries of v{version}"
            )
        verdict = _verdict(
            model,
            version,
            reasons,
            judged=True,
            drift=drift,
            retrain_due=drift and not cooling,
            stats=stats,
            queries=len(read.queries),
            measured=len(queries),
            thresholds=thresholds.to_dict(),
            **window,
        )
        if commit:
            entry["offsets"][str(version)] = read.offsets
            entry["last_check_at"] = verdict["checked_at"]
            if drift:
                entry["last_drift_at"] = verdict["checked_at"]
            _save_state(state_path, state)
    log.info(
        "query drift %s v%s: drift=%s over %d queries; %s",
        model,
        version,
        drift,
        len(read.queries),
        "; ".join(reasons),
    )
    return verdict


# -- what a drift leads to --------------------------------------------------------------------


def record_drift(settings: Settings, verdict: dict[str, Any]) -> dict[str, Any]:
    """Audit record plus alert (local alert log, and ``RECSYS_ALERT_WEBHOOK`` when set) for a
    drifted verdict; returns the audit record."""
    from recsys import audit
    from recsys.alerts import post_alert

    fields = {
        "version": verdict["version"],
        "reason": "; ".join(verdict["reasons"]),
        "stats": verdict["stats"],
        "queries": verdict["queries"],
        "retrain_due": verdict["retrain_due"],
        "window": {"first_ts": verdict.get("first_ts"), "last_ts": verdict.get("last_ts")},
    }
    record = audit.append_record(settings.audit_log, DRIFT, verdict["model"], **fields)
    post_alert(
        settings,
        f"{verdict['model']} v{verdict['version']}: served queries drifted from the training data",
        {"model": verdict["model"], "kind": DRIFT, **fields},
    )
    return record


def record_retraining_request(settings: Settings, verdict: dict[str, Any]) -> dict[str, Any]:
    """Remember the request (it starts the cooldown) and audit it; returns the audit record,
    whose fields also go into the Asset event's ``extra``."""
    from recsys import audit

    model = verdict["model"]
    with _locked(settings.drift_state):
        state = _load_state(settings.drift_state)
        entry = state["models"].setdefault(model, {})
        entry["last_retraining_request_at"] = time.time()
        _save_state(settings.drift_state, state)
    return audit.append_record(
        settings.audit_log,
        RETRAINING_REQUESTED,
        model,
        version=verdict["version"],
        reason="; ".join(verdict["reasons"]),
    )
