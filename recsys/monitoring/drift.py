"""Online query drift: are people searching for what the served model was trained on?

:func:`check_query_drift` reads the queries Triton's model sampled for the serving version since
the last check (:mod:`recsys.monitoring.query_samples`), measures them with that version's own
tokenizer and encoder, and judges them against the version's training reference
(``query_reference.json`` in its folder; :mod:`recsys.families.search.drift_policy` says how). The
``query_drift`` DAG runs it hourly, alerts and audits a drift (:func:`record_drift`) and, when
asked to, requests retraining through an Airflow Asset (:func:`record_retraining_request`).

What the check remembers lives in a small JSON file (``Settings.drift_state``), written
atomically under a lock like the metrics monitor's state: per model and version, the byte
offset read in each sample file, and the sampler's counters when the unread samples began.
Samples are consumed only by a judgement: too few, or a version without a reference, leaves
them for the next check, so a quiet model is judged once enough traffic has accumulated.

What must survive that file being lost comes from the append-only audit log instead
(:mod:`recsys.audit`), the authoritative history: when retraining was last requested (the
cooldown), and whether a "drift check is blind" outage is open (alerted once, closed by a
``query_drift_seeing_again`` record). A corrupt state file then costs at most re-reading some
samples, never a second retraining request or a second alert for the same outage; the verdict
says that it was corrupt.

A check that cannot see says so rather than reporting "too few queries" forever
(:func:`sampling_status`): the served model exports its sampler's health as Triton custom
metrics, and a sampler that fails to write, or samples that stop arriving while Triton keeps
serving, make the verdict ``blind``. Sampling turned off on purpose (rate 0) is not blindness.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from recsys.config import Settings, check_model_name, check_version_number
from recsys.monitoring.drift_thresholds import DriftThresholds
from recsys.monitoring.query_samples import SamplerHealth
from recsys.statefile import read_json_state, state_lock, write_json_atomically

log = logging.getLogger(__name__)

DRIFT = "query_drift"
RETRAINING_REQUESTED = "retraining_requested"
BLIND = "query_drift_blind"
"""Audit action (and alert kind): the check cannot see the served queries; opens an outage."""
SEEING_AGAIN = "query_drift_seeing_again"
"""Audit action: the outage a :data:`BLIND` record opened is over."""
_STATE_FORMAT = 1

MIN_EXPECTED_SAMPLES = 20
"""Samples that should have arrived before "none arrived" counts as blindness: at 20 the chance
of a working sampler writing none is below e^-20 (0 of 20 expected), so a quiet hour never looks
blind."""


# -- state ------------------------------------------------------------------------------------


def _drift_state(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT:
        raise ValueError("not a drift state record")
    if not isinstance(data.get("models"), dict):
        raise ValueError("no 'models' mapping")
    return data


def _load_state(path: Path) -> tuple[dict[str, Any], str | None]:
    """The state file's content and ``None``, or a fresh state and what was wrong with a
    corrupt file (for the verdict's reasons). Starting again is safe because nothing in the
    state is history: the worst it costs is reading some samples twice (the cooldown and the
    outage memory come from the audit log, :func:`_audit_history`)."""
    state, problem = read_json_state(path, _drift_state, "drift state")
    return (state if state is not None else {"format": _STATE_FORMAT, "models": {}}), problem


def _save_state(path: Path, state: dict[str, Any]) -> None:
    write_json_atomically(path, state)


def _locked(path: Path):
    return state_lock(path, 120.0, "drift state")


# -- history from the audit log ----------------------------------------------------------------


@dataclass(frozen=True)
class _History:
    """What the audit log says about one model's drift checks."""

    last_retraining_request: dict[str, Any] | None
    """The newest ``retraining_requested`` record (it starts the cooldown)."""
    open_outage: dict[str, Any] | None
    """The newest ``query_drift_blind`` record when no ``query_drift_seeing_again`` followed it:
    an outage already alerted."""

    @property
    def last_retraining_request_at(self) -> float | None:
        record = self.last_retraining_request
        return None if record is None else _record_time(record)


def _record_time(record: dict[str, Any]) -> float:
    """An audit record's ``ts`` (ISO 8601, as :func:`recsys.audit.append_record` writes it) in
    unix seconds."""
    return datetime.fromisoformat(str(record["ts"])).timestamp()


def _audit_history(settings: Settings, model: str) -> _History:
    """Retraining requests and blind outages of ``model``, from the audit log (oldest first, so
    the last match wins). Records without a readable ``ts`` are skipped with a warning: the log
    is append-only, and a task failing on one bad line every hour would page more than it
    helps."""
    from recsys import audit

    last_request = outage = None
    for record in audit.read_records(settings.audit_log, model):
        action = record.get("action")
        if action not in (RETRAINING_REQUESTED, BLIND, SEEING_AGAIN):
            continue
        try:
            _record_time(record)
        except (KeyError, TypeError, ValueError):
            log.warning("audit record without a readable ts skipped: %r", record)
            continue
        if action == RETRAINING_REQUESTED:
            last_request = record
        else:
            outage = record if action == BLIND else None
    return _History(last_retraining_request=last_request, open_outage=outage)


# -- can the check see? -------------------------------------------------------------------------


def sampler_health(settings: Settings, model: str, version: int) -> SamplerHealth:
    """The served version's sampler health from Triton's metrics endpoint. Raises
    ``ValueError`` naming the endpoint when it cannot be read or is not Triton's."""
    import requests

    from recsys.monitoring.query_samples import parse_sampler_metrics

    url = settings.triton_metrics_url
    try:
        response = requests.get(url, timeout=5.0)
        response.raise_for_status()
        return parse_sampler_metrics(response.text, model, version)
    except (requests.RequestException, ValueError) as exc:
        raise ValueError(f"Triton metrics {url} unreadable ({type(exc).__name__}: {exc})") from exc


def _counter_delta(now: float | None, before: Any) -> float | None:
    """Growth of a cumulative counter; a counter below its baseline was reset (Triton restarted
    or reloaded the version), so all of it is new. ``None`` when either side is unknown."""
    if now is None or not isinstance(before, int | float):
        return None
    return now - before if now >= before else now


def folder_problem(folder: Path) -> str | None:
    """Why the sampler cannot write to ``folder``, as far as this side can tell (``None`` when
    it looks writable): a path that is not a folder, a folder the platform's user cannot write,
    or a full disk. A missing folder is fine: the sampler creates it."""
    path = Path(folder)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (EACCES)"
    free = shutil.disk_usage(existing).free
    if free < 1024 * 1024:
        return f"the disk of {existing} is full ({free} bytes free, ENOSPC)"
    return None


SAMPLING_STATUSES = ("ok", "quiet", "blind", "off", "unknown")


def sampling_status(
    settings: Settings,
    model: str,
    version: int,
    health: SamplerHealth | None,
    baseline: dict[str, Any] | None,
    unread: int,
) -> tuple[str, str | None]:
    """``(status, reason)``: can the check see the queries ``model`` ``version`` serves?

    ``baseline`` is what the previous check saw (Triton's inference count, the unread samples,
    when), ``unread`` the samples waiting now, so "new samples" and "samples that should be
    new" both cover the time since that check.

    * ``off``: sampling is off on purpose (``RECSYS_QUERY_SAMPLE_RATE=0``); nothing to judge,
      nothing to alert;
    * ``unknown``: Triton's metrics could not be read (``health`` is ``None``); the triton
      monitor alerts on that, so it is no second alert here;
    * ``blind``: Triton ran enough inferences of the version since the last check that at
      least :data:`MIN_EXPECTED_SAMPLES` samples were due at the rate, and none arrived; the
      reason names what is wrong with the sample folder when this side can see it;
    * ``ok``: new samples arrived;
    * ``quiet``: nothing arrived and too little was expected to tell (a quiet hour); neither
      opens nor closes an outage, so one outage spanning a quiet night is alerted once.
    """
    folder = settings.query_sample_dir / check_model_name(model) / str(version)
    if settings.query_sample_rate == 0:
        return "off", "query sampling is off (RECSYS_QUERY_SAMPLE_RATE=0): nothing to judge"
    if health is None:
        return "unknown", None
    baseline = baseline or {}
    before = baseline.get("unread")
    arrived = unread - before if isinstance(before, int) and unread >= before else unread
    if arrived > 0:
        return "ok", None
    served = _counter_delta(health.inference_count, baseline.get("inference_count"))
    expected = None if served is None else served * settings.query_sample_rate
    if expected is None or expected < MIN_EXPECTED_SAMPLES:
        return "quiet", None
    problem = folder_problem(folder)
    cause = (
        f"{problem}; make it a writable folder with free space (the sampler retries on its own)"
        if problem
        else "the folder looks writable: do tritonserver and Airflow agree on "
        "RECSYS_QUERY_SAMPLE_DIR and RECSYS_QUERY_SAMPLE_RATE? (the sampler logs its write "
        "errors, and bad settings, in Triton's log)"
    )
    return "blind", (
        f"drift check blind: Triton ran {served:.0f} inferences of {model} v{version} since "
        f"{_when(baseline.get('at'))} (about {expected:.0f} samples due at rate "
        f"{settings.query_sample_rate:g}) but none arrived in {folder}: {cause}"
    )


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "the last check"
    return datetime.fromtimestamp(float(ts)).astimezone().isoformat(timespec="seconds")


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
        "blind": False,
        "blind_alert_due": False,
        "outage_over": False,
        "outage_since": None,
        "sampling": None,
        "state_problem": None,
    }
    verdict.update(fields)
    return verdict


def _outage_fields(history: _History, status: str) -> tuple[dict[str, Any], list[str]]:
    """The verdict's outage fields and reasons for sampling ``status``: a new blind outage is
    due an alert, a known one is not; ``ok`` or ``off`` ends an open one."""
    outage = history.open_outage
    fields: dict[str, Any] = {
        "blind": status == "blind",
        "blind_alert_due": status == "blind" and outage is None,
        "outage_over": status in ("ok", "off") and outage is not None,
        "outage_since": None if outage is None else outage["ts"],
    }
    reasons = []
    if status == "blind" and outage is not None:
        reasons.append(
            f"blind since {outage['ts']} (alerted then): no new alert until it sees again"
        )
    elif fields["outage_over"]:
        seeing = "sampling is off on purpose" if status == "off" else "sampled queries arrive"
        reasons.append(f"the drift check is no longer blind (since {outage['ts']}): {seeing}")
    return fields, reasons


def _state_note(path: Path, problem: str, history: _History) -> str:
    last = history.last_retraining_request
    cooldown = (
        f"last retraining request {last['ts']}" if last is not None else "no retraining request"
    )
    return (
        f"drift state {path} was corrupt ({problem}) and starts again: sample offsets are lost, "
        "so queries already judged may be judged again; the retraining cooldown and the blind "
        f"outage come from the audit log and are kept ({cooldown})"
    )


def check_query_drift(
    settings: Settings,
    model: str | None = None,
    version: int | None = None,
    thresholds: DriftThresholds | None = None,
    *,
    commit: bool = True,
    family_limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Judge the queries sampled for ``model`` (default: the platform's) ``version`` (default:
    the serving one, see :func:`serving_version`) since the last committed check.

    Returns a JSON-safe verdict: ``judged`` (False with too few queries, no reference, no
    serving version, sampling off, or a blind check; the ``reasons`` say which), ``drift``,
    ``retrain_due`` (drift and no retraining request in the audit log within the cooldown),
    ``reasons``, ``stats``, ``queries``, the sample window (``first_ts`` / ``last_ts``), and
    whether the check can see: ``sampling`` (:func:`sampling_status` and the sampler's
    metrics), ``blind``, ``blind_alert_due`` (blind, and no outage alerted yet),
    ``outage_over`` (an alerted outage has ended) and ``outage_since``. ``state_problem`` is
    set when the state file was corrupt (also in the reasons). With ``commit`` (the DAG) a
    judged sample is consumed and the state saved; without (``recsys drift``) the check only
    looks.

    ``thresholds`` default to :func:`recsys.monitoring.config.load_drift_thresholds`. What is
    measured is the served version's family's business
    (:meth:`recsys.families.base.ModelFamily.drift_check`: query lengths, vocabulary and
    embeddings for search; unknown users and items and the item-popularity shift for
    recommendation); ``family_limits`` overrides that family's own limits. This function only
    reads the samples, decides whether there are enough, and keeps the state and history.
    """
    from recsys.monitoring.config import load_drift_thresholds
    from recsys.monitoring.query_samples import read_new_samples, version_sample_dir
    from recsys.triton.repository import IncompleteArtifactsError

    # Both become paths (version folder, sample folder): checked before anything is read.
    model = check_model_name(model or settings.model_name)
    if version is not None:
        check_version_number(version)
    thresholds = thresholds or load_drift_thresholds(model)
    if version is None:
        version = serving_version(settings, model)
    if version is None:
        return _verdict(model, None, [f"{model}: no version serves; nothing to judge"])
    version_dir = settings.triton_repo / model / str(version)
    try:
        family = family_of_version(version_dir)
    except IncompleteArtifactsError as exc:
        return _verdict(model, version, [f"{model} v{version} cannot be judged: {exc}"])
    reference_file = family.drift_reference_file
    if reference_file is None or not (version_dir / reference_file).is_file():
        return _verdict(
            model,
            version,
            [
                f"{model} v{version} has no {reference_file or 'drift reference'} (published "
                "before drift references, or exported without training data); no judgement"
            ],
        )

    notes: list[str] = []
    health: SamplerHealth | None = None
    if settings.query_sample_rate > 0:
        try:
            health = sampler_health(settings, model, version)
        except ValueError as exc:  # Triton down: the metrics monitor alerts on that
            notes.append(f"cannot tell whether the query sampler works: {exc}")

    state_path = settings.drift_state
    with _locked(state_path):
        state, state_problem = _load_state(state_path)
        history = _audit_history(settings, model)
        if state_problem is not None:
            notes.append(_state_note(state_path, state_problem, history))
        entry = state["models"].setdefault(model, {})
        offsets = entry.setdefault("offsets", {}).get(str(version), {})
        baselines = entry.setdefault("sampler", {})
        read = read_new_samples(
            version_sample_dir(settings.query_sample_dir, model, version), offsets
        )
        status, status_reason = sampling_status(
            settings, model, version, health, baselines.get(str(version)), len(read.queries)
        )
        outage, outage_reasons = _outage_fields(history, status)
        window = {"first_ts": read.first_ts, "last_ts": read.last_ts, "bad_lines": read.bad_lines}
        common = {
            "queries": len(read.queries),
            "sampling": {"status": status, **(health.to_dict() if health else {})},
            "state_problem": state_problem,
            **outage,
            **window,
        }

        def remember(consumed: bool) -> None:
            """Save what this check saw (on ``commit``): the offsets when it consumed the
            sample, and the counters the next check measures "new" from."""
            if not commit:
                return
            if consumed:
                entry["offsets"][str(version)] = read.offsets
            baselines[str(version)] = {
                "at": time.time(),
                "inference_count": health.inference_count if health else None,
                "unread": 0 if consumed else len(read.queries),
            }
            entry["last_check_at"] = time.time()
            _save_state(state_path, state)

        if status in ("blind", "off"):
            remember(consumed=False)
            verdict = _verdict(
                model, version, [str(status_reason), *outage_reasons, *notes], **common
            )
            _log_verdict(verdict)
            return verdict
        if len(read.queries) < thresholds.min_queries:
            remember(consumed=False)
            verdict = _verdict(
                model,
                version,
                [
                    f"only {len(read.queries)} sampled queries for {model} v{version} since the "
                    f"last check (< min_queries {thresholds.min_queries}): too few to judge; "
                    "they are kept for the next check",
                    *outage_reasons,
                    *notes,
                ],
                **common,
            )
            _log_verdict(verdict)
            return verdict
        queries = read.queries
        if len(queries) > thresholds.max_queries:
            queries = random.Random(0).sample(queries, thresholds.max_queries)
        stats, reasons = family.drift_check(version_dir, queries, thresholds, family_limits or {})
        drift = bool(reasons)
        last_request = history.last_retraining_request_at
        cooling = (
            last_request is not None
            and time.time() - last_request < thresholds.retrain_cooldown_hours * 3600
        )
        if drift and cooling:
            reasons.append(
                "retraining was already requested "
                f"{(time.time() - float(last_request)) / 3600:.1f} h ago (cooldown "
                f"{thresholds.retrain_cooldown_hours:g} h, from the audit log): alerting only"
            )
        if not drift:
            reasons.append(
                f"{len(read.queries)} sampled queries look like the training queries of v{version}"
            )
        verdict = _verdict(
            model,
            version,
            [*reasons, *outage_reasons, *notes],
            judged=True,
            drift=drift,
            retrain_due=drift and not cooling,
            stats=stats,
            measured=len(queries),
            thresholds=thresholds.to_dict(),
            **common,
        )
        if drift and commit:
            entry["last_drift_at"] = verdict["checked_at"]
        remember(consumed=True)
    _log_verdict(verdict)
    return verdict


def family_of_version(version_dir: Path) -> Any:
    """The :class:`recsys.families.base.ModelFamily` of a published version folder."""
    from recsys.triton.repository import manifest_family, verify_version_dir

    return manifest_family(verify_version_dir(version_dir))


def _log_verdict(verdict: dict[str, Any]) -> None:
    log.info(
        "query drift %s v%s: judged=%s drift=%s blind=%s over %d queries; %s",
        verdict["model"],
        verdict["version"],
        verdict["judged"],
        verdict["drift"],
        verdict["blind"],
        verdict["queries"],
        "; ".join(verdict["reasons"]),
    )


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
    """Audit the request and return the record, whose fields also go into the Asset event's
    ``extra``. The record itself starts the cooldown (:func:`_audit_history`): no second copy in
    the state file that a corrupt file could lose."""
    from recsys import audit

    return audit.append_record(
        settings.audit_log,
        RETRAINING_REQUESTED,
        verdict["model"],
        version=verdict["version"],
        reason="; ".join(verdict["reasons"]),
    )


def record_blind(settings: Settings, verdict: dict[str, Any]) -> dict[str, Any] | None:
    """Open a blind outage: a ``query_drift_blind`` audit record and one alert naming the model,
    version and why. Returns the record, or ``None`` when the audit log already holds an open
    outage of the model (a retried or overlapping task), so an outage is alerted once."""
    from recsys import audit
    from recsys.alerts import post_alert

    model = verdict["model"]
    fields = {
        "version": verdict["version"],
        "reason": "; ".join(verdict["reasons"]),
        "sampling": verdict["sampling"],
        "unread_queries": verdict["queries"],
    }
    with _locked(settings.drift_state):
        open_outage = _audit_history(settings, model).open_outage
        if open_outage is not None:
            log.info("%s: blind outage since %s already alerted", model, open_outage["ts"])
            return None
        record = audit.append_record(settings.audit_log, BLIND, model, **fields)
    post_alert(
        settings,
        f"{model} v{verdict['version']}: query drift check is blind (served queries are not "
        "being sampled)",
        {"model": model, "kind": BLIND, **fields},
    )
    return record


def record_seeing_again(settings: Settings, verdict: dict[str, Any]) -> dict[str, Any] | None:
    """Close the open blind outage with a ``query_drift_seeing_again`` audit record (no alert:
    the outage was alerted once, its end is history). ``None`` when no outage is open."""
    from recsys import audit

    model = verdict["model"]
    with _locked(settings.drift_state):
        open_outage = _audit_history(settings, model).open_outage
        if open_outage is None:
            return None
        return audit.append_record(
            settings.audit_log,
            SEEING_AGAIN,
            model,
            version=verdict["version"],
            blind_since=open_outage["ts"],
            blind_version=open_outage.get("version"),
            sampling=verdict["sampling"],
            reason="; ".join(verdict["reasons"]),
        )
