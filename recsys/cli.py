"""`recsys` command line: run the stack, train, deploy, roll back and inspect the platform.

recsys stack up|down|status          start/stop/inspect Triton, MLflow and Airflow on loopback
                                     (up --executor celery: Redis + a Celery worker per queue)
recsys data validate PATH            run the Great Expectations gate on a relevance CSV
recsys train [--wait]                trigger search_model_pipeline on the running stack
                                     (--family recommend: recommend_model_pipeline)
recsys deploy --version N            serve a registered version (rebuilt from MLflow if needed)
                                     (--instances, --max-batch-size, --[no-]dynamic-batching,
                                     --max-queue-delay-us, --intra-op-threads: serving knobs)
recsys deploy --version N --canary   roll it out step by step behind the model's router
                                     (--shadow: mirror traffic to it); the rollout DAG judges it
recsys canary status|promote|abort   the rollout under way (weight PERCENT: move it by hand)
recsys experiment start|status|stop  an A/B experiment: fixed split, per-arm click-through
recsys feedback --request-id R       log a click/purchase against a routed answer
recsys rollback [--to N]             put the previous (or given) version back into service
                                     (deploy, rollback, query: --model M for another served
                                     model, e.g. the reranker model <model>_reranker)
recsys rollback --complete-pending   replay registry updates a rollback left pending (MLflow down)
recsys status                        services, served versions, aliases, recent audit records
recsys audit [--action A]            the deploy/rollback audit trail
recsys drift [--model M]             are served queries drifting from the training queries?
recsys query "cordless drill"        ask the served model over gRPC
recsys recommend --user U            ask the served recommender (--history 11,52,7 for a
                                     session); deploy/rollback/status --model item_recommender
recsys demo                          stack up -> train+deploy -> query -> fault -> rollback

Exit codes: 0 ok; 1 the operation failed (bad data, failed run, failed deploy); 2 bad input
(arguments, missing or unreadable files, unknown version); 3 a service is unavailable (Triton,
MLflow, Airflow), which `recsys status` also returns after printing what it could find out.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from recsys.config import Settings, check_model_name, load_settings
from recsys.families.search.client import search_answered
from recsys.families.search.hybrid import RETRIEVAL_MODES
from recsys.families.search.profiles import PROFILE_NAMES

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


# -- argument types ---------------------------------------------------------------------------
# Checked by argparse, so bad values exit 2 with a message naming them before anything is
# contacted (an empty query would otherwise reach Triton and come back as a model error, exit 1).


def _query_text(value: str) -> str:
    """A query with at least one non-blank character."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"the query must contain a word, got {value!r}")
    return value


def _whole_number(value: str, minimum: int, too_small: str) -> int:
    """``value`` as an int of at least ``minimum``; ``too_small`` says why the bound exists."""
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from exc
    if number < minimum:
        raise argparse.ArgumentTypeError(f"{too_small}, got {number}")
    return number


def _version_number(value: str) -> int:
    """A registry version number: MLflow numbers versions from 1."""
    return _whole_number(value, 1, "versions are numbered from 1")


def _model_name(value: str) -> str:
    """A model name the platform may turn into paths (:func:`recsys.config.check_model_name`:
    letters, digits, '_' and '-'): ``../x``, ``a/b``, empty, NUL or newline exit 2 here, before
    any lock, state file, sample folder or audit record is touched."""
    try:
        return check_model_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(value: str) -> dict[str, Any]:
    """A JSON object given on the command line (e.g. a smoke request)."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like {{...}}, got {value!r}")
    return parsed


def _positive_int(value: str) -> int:
    """A count of at least 1 (e.g. how many hits to return)."""
    return _whole_number(value, 1, "must be at least 1")


# -- stack ------------------------------------------------------------------------------------


def _stack(args: argparse.Namespace) -> int:
    from recsys import stack

    settings = load_settings()
    if args.action == "up":
        executor = stack.resolve_executor(args.executor)
        print(f"starting the stack (state in {settings.home}, {executor} executor)")
        stack.up(settings, executor=executor)
        _print_services(stack.status(settings))
        # Where the password is, never the password: this output ends up in logs people keep.
        print(f"\nAirflow login: {stack.airflow_login_hint(settings)}")
    elif args.action == "down":
        stack.down(settings)
    else:
        _print_services(stack.status(settings))
    return 0


def _print_services(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        state = "healthy" if row["healthy"] else ("running" if row["pid"] else "stopped")
        print(f"  {row['service']:<22} {state:<8} pid={row['pid'] or '-':<8} {row['endpoint']}")


# -- data -------------------------------------------------------------------------------------


def _default_report_dir(settings: Settings, data_path: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return settings.home / "quality" / f"{data_path.stem}-{stamp}"


def _data_validate(args: argparse.Namespace) -> int:
    from recsys.data import read_relevance_csv
    from recsys.families.search.pipeline import QUALITY_SUITES
    from recsys.quality import DataQualityError, validate_frame

    path = Path(args.path)
    frame = read_relevance_csv(path)
    out = Path(args.out) if args.out else _default_report_dir(load_settings(), path)
    suites = args.suite or list(QUALITY_SUITES)
    try:
        report = validate_frame(frame, suites, out)
    except DataQualityError as exc:
        if exc.report is not None:
            _print_quality(path, exc.report)
        print(f"recsys data validate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_quality(path, report)
    return 0


def _print_quality(path: Path, report: Any) -> None:
    summary = report.to_summary()
    rows = summary["rows"]
    print(f"data quality of {path}: {'PASSED' if report.success else 'FAILED'}")
    print(f"  rows in {rows['input']}, clean {rows['clean']}, quarantined {rows['quarantined']}")
    print(f"  {'suite':<20} {'result':<8} {'critical':>8} {'warnings':>8}")
    for name, suite in summary["suites"].items():
        result = "passed" if suite["success"] else "FAILED"
        critical, warnings = len(suite["critical_failures"]), len(suite["warnings"])
        print(f"  {name:<20} {result:<8} {critical:>8} {warnings:>8}")
    for failure in summary["critical_failures"]:
        print(f"  critical: {failure}")
    for reason, count in summary["quarantine_reasons"].items():
        print(f"  quarantined {count:>5}: {reason}")
    print(f"  report:    {summary['paths']['summary_json']}")
    print(f"  data docs: {summary['paths']['data_docs']}")


# -- train ------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from recsys import operations
    from recsys.airflow_client import task_progress_line
    from recsys.progress import progress_bar

    conf = operations.build_train_conf(
        data_path=args.data,
        base_model=args.base_model,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_rows=args.max_rows,
    )
    search_only = {"profile": args.profile, "retrieval": args.retrieval}
    conf.update({key: value for key, value in search_only.items() if value is not None})
    dag_id = operations.PIPELINE_DAG
    if args.family != "search":
        if set(search_only) & set(conf):
            raise ValueError("--profile and --retrieval are search-family options")
        # The generic pipeline's params: the data, epochs and a slice of users.
        dag_id = f"{args.family}_model_pipeline"
        conf.pop("max_rows", None)
        if "base_model" in conf or "max_steps" in conf:
            raise ValueError("--base-model and --max-steps are search-family options")
        if args.max_users is not None:
            conf["max_users"] = _whole_number(str(args.max_users), 0, "--max-users is >= 0")
    elif args.max_users is not None:
        raise ValueError("--max-users is a recommend-family option; use --max-rows for search")
    settings = load_settings()
    client = operations.airflow_client(settings)
    run_id, paused = operations.trigger_training(client, conf, unpause=args.unpause, dag_id=dag_id)
    print(f"triggered {dag_id} run {run_id} with conf {json.dumps(conf)}")
    print(f"  watch it in the Airflow UI: {client.ui_run_url(dag_id, run_id)}")
    if paused:
        print(
            f"note: {dag_id} is paused; the run waits until it is unpaused "
            "(rerun with --unpause or unpause it in the Airflow UI)",
            file=sys.stderr,
        )
    if not args.wait:
        return 0
    bar = progress_bar(total=None, desc=run_id, unit="task")

    def on_progress(done: int, total: int, tasks: dict[str, str]) -> None:
        running = [task for task, state in tasks.items() if state == "running"]
        bar.total = total or None
        bar.n = done
        bar.set_postfix_str(",".join(running) or "-", refresh=False)
        bar.refresh()

    def on_task_finished(task: Any, elapsed_s: float | None) -> None:
        # Without a terminal the bar is off: one line per finished task is the progress then.
        if bar.disable:
            print(task_progress_line(task, elapsed_s), flush=True)

    try:
        outcome = operations.follow_run(
            client,
            run_id,
            dag_id=dag_id,
            on_progress=on_progress,
            on_task_finished=on_task_finished,
        )
    finally:
        bar.close()
    print(f"run {run_id}: {outcome.state} ({len(outcome.tasks)} tasks)")
    return 0


# -- deploy / rollback ------------------------------------------------------------------------


MODEL_HELP = "served model (default: RECSYS_MODEL_NAME; e.g. product_search_reranker)"


def _settings_for(args: argparse.Namespace) -> Settings:
    """The platform settings aimed at ``--model`` (another served model, e.g. the reranker
    model ``<RECSYS_MODEL_NAME>_reranker``), or at ``RECSYS_MODEL_NAME`` without it."""
    import dataclasses

    settings = load_settings()
    model = getattr(args, "model", None)
    if model is None:
        return settings
    return dataclasses.replace(settings, model_name=check_model_name(model))


SERVING_FLAGS: dict[str, str] = {
    "instances": "instance_count",
    "max_batch_size": "max_batch_size",
    "dynamic_batching": "dynamic_batching",
    "max_queue_delay_us": "max_queue_delay_us",
    "intra_op_threads": "intra_op_threads",
}
"""``recsys deploy`` serving flags (argparse dest) -> the serving knob each sets."""


def _serving_knob(knob: str) -> Any:
    """An argparse type: a whole number the serving knob ``knob`` accepts."""

    def parse(value: str) -> int:
        from recsys.triton.repository import check_serving_knobs

        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        try:
            return check_serving_knobs({knob: number}, what=knob)[knob]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _serving_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The serving knobs ``recsys deploy`` was given (the rest: the platform's defaults)."""
    given = {
        knob: getattr(args, dest)
        for dest, knob in SERVING_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    return given or None


def _describe_serving(knobs: dict[str, Any]) -> str:
    batching = (
        f"dynamic batching up to {knobs['max_batch_size']} "
        f"({knobs['max_queue_delay_us']} us queue delay)"
        if knobs.get("dynamic_batching")
        else f"no dynamic batching (max batch {knobs['max_batch_size']})"
    )
    return (
        f"{knobs['instance_count']} instance(s) x {knobs['intra_op_threads']} ONNX Runtime "
        f"thread(s), {batching}"
    )


def _deploy(args: argparse.Namespace) -> int:
    from recsys.operations import deploy_registered_version

    if args.canary:
        return _start_rollout(args, "canary", {"steps": args.steps})
    if args.shadow is not None:
        return _start_rollout(args, "shadow", {"shadow_share": args.shadow / 100.0})
    settings = _settings_for(args)
    request = dict(args.smoke_request or {})
    if args.smoke_query is not None:
        request["query"] = args.smoke_query
    if args.top_k is not None:
        request["top_k"] = args.top_k
    result = deploy_registered_version(
        settings, args.version, smoke_request=request or None, serving=_serving_flags(args)
    )
    how = "rebuilt from MLflow and deployed" if result["rebuilt"] else "loaded"
    replaced = f"v{result['replaced']}" if result["replaced"] is not None else "nothing"
    print(f"{settings.model_name} v{result['version']} {how}; champion now (replaced {replaced})")
    top = ", ".join(f"{pid} {score:.3f}" for pid, score, *_ in result["smoke"][:3])
    print(f"  smoke test ({json.dumps(request) if request else 'as exported'}): {top}")
    print(f"  serving: {_describe_serving(result['serving'])}")
    return 0


def _rollout_dag(settings: Settings) -> str:
    """The rollout DAG of the served model ``settings.model_name``."""
    from recsys.config import served_model_settings
    from recsys.families import rollout_dag_id, served_models

    base = load_settings()
    for family, suffixes in served_models().items():
        for suffix in suffixes:
            if served_model_settings(base, suffix, family).model_name == settings.model_name:
                return rollout_dag_id(family, suffix)
    raise ValueError(f"{settings.model_name} is not a served model of any family")


def _start_rollout(args: argparse.Namespace, mode: str, conf: dict[str, Any]) -> int:
    """Start a rollout of ``args.version`` here (load, smoke test, router), then hand it to
    the model's rollout DAG, which judges it and promotes or aborts."""
    from recsys import operations
    from recsys.delivery.rollout import start_weight

    settings = _settings_for(args)
    dag_id = _rollout_dag(settings)
    started = operations.start_registered_rollout(
        settings,
        args.version,
        mode=mode,
        weight=start_weight(mode, conf.get("steps"), conf.get("split")),
        shadow_share=float(conf.get("shadow_share", 0.0)),
        smoke_request=getattr(args, "smoke_request", None),
        serving=_serving_flags(args),
        reason=f"recsys {args.command}",
    )
    share = (
        f"{started['shadow_share']:.0%} of traffic mirrored"
        if mode == "shadow"
        else f"{started['weight']:.0%} of routed traffic"
    )
    print(
        f"{settings.model_name}: {mode} of v{started['candidate']} against "
        f"v{started['stable']} started ({started['rollout_id']}), {share}"
    )
    print(f"  clients take part through the router: model {settings.model_name}_router")
    if getattr(args, "no_analysis", False):
        print("  no analysis DAG: move it with `recsys canary weight|promote|abort`")
        return 0
    extra = dict(getattr(args, "analysis", None) or {})
    try:
        client = operations.airflow_client(settings)
        run_id = client.trigger(dag_id, {**extra, **conf, "version": args.version, "mode": mode})
    except Exception as exc:
        # The rollout runs: say so, and how to finish it, whatever kept the DAG from starting.
        raise type(exc)(
            f"{mode} of v{args.version} started but its analysis DAG {dag_id} could not be "
            f"triggered ({exc}); trigger it from the Airflow UI with "
            f'{{"version": {args.version}, "mode": "{mode}"}} or finish by hand with '
            f"`recsys canary promote|abort`"
        ) from exc
    print(f"  analysis: {dag_id} run {run_id}: {client.ui_run_url(dag_id, run_id)}")
    return 0


def _canary(args: argparse.Namespace) -> int:
    from recsys.delivery import rollout
    from recsys.delivery.analysis import read_state

    settings = _settings_for(args)
    if args.action == "status":
        return _print_rollout_status(settings, read_state(settings.home, settings.model_name))
    if args.action == "weight":
        if args.percent is None:
            raise ValueError("canary weight needs PERCENT (0-100)")
        updated = rollout.set_weight(settings, args.percent / 100.0, args.reason)
        print(f"{settings.model_name}: candidate v{updated.candidate} now gets "
              f"{updated.candidate_weight:.0%} of routed traffic")  # fmt: skip
        return 0
    if args.action == "promote":
        done = rollout.promote_rollout(settings, args.reason)
        print(f"{settings.model_name} v{done['promoted']} promoted (replaced v{done['replaced']})")
        return 0
    done = rollout.abort_rollout(settings, args.reason)
    print(f"{settings.model_name}: v{done['aborted']} aborted; v{done['serving']} serves alone")
    return 0


def _print_rollout_status(settings: Settings, state: Any) -> int:
    from recsys.delivery.rollout import active_rollout

    routing = active_rollout(settings)
    if routing is None:
        print(f"{settings.model_name}: no rollout under way")
    else:
        weight = (
            f"shadow share {routing.shadow_share:.0%}"
            if routing.mode == "shadow"
            else f"candidate weight {routing.candidate_weight:.0%}"
        )
        print(
            f"{settings.model_name}: {routing.mode} {routing.rollout_id}: stable "
            f"v{routing.stable}, candidate v{routing.candidate}, {weight}"
        )
    if state is None:
        return 0
    print(f"analysis of {state.rollout_id} ({state.mode}): step {state.step_index + 1}, "
          f"{state.windows_passed} window(s) passed in this step")  # fmt: skip
    for window in state.windows[-5:]:
        when = datetime.fromtimestamp(window["at"]).strftime("%H:%M:%S")
        print(f"  {when} {window['outcome']}: {'; '.join(window['reasons'])}")
    if state.result is not None:
        print(f"decided: {state.result['decision']}: {'; '.join(state.result['reasons'])}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from recsys.delivery import rollout
    from recsys.delivery.feedback import FeedbackLog, feedback_log_path
    from recsys.delivery.stats import compare_arms

    settings = _settings_for(args)
    if args.action == "start":
        if args.version is None:
            raise ValueError("experiment start needs --version")
        conf = {
            "split": args.split,
            "duration_minutes": args.minutes,
            "sample_size": args.sample_size,
            "promote_if_better": args.promote_if_better,
        }
        return _start_rollout(args, "experiment", conf)  # fmt: skip
    routing = rollout.active_rollout(settings)
    if args.action == "stop":
        done = rollout.end_rollout(settings, args.reason)
        print(f"{settings.model_name}: experiment over, v{done['ended']} unloaded, "
              f"v{done['serving']} serves alone")  # fmt: skip
        return 0
    if routing is None or routing.mode != "experiment":
        print(f"{settings.model_name}: no experiment under way")
        return 0
    summary = FeedbackLog(feedback_log_path(settings.home, settings.model_name)).arm_outcomes(
        routing.rollout_id
    )
    comparison = compare_arms(summary.stable, summary.candidate)
    print(f"{settings.model_name}: experiment {routing.rollout_id}: v{routing.candidate} gets "
          f"{routing.candidate_weight:.0%}")  # fmt: skip
    print(f"  {comparison.summary}")
    return 0


def _feedback(args: argparse.Namespace) -> int:
    from recsys.delivery.feedback import FeedbackLog, feedback_log_path

    settings = _settings_for(args)
    log = FeedbackLog(feedback_log_path(settings.home, settings.model_name))
    log.record_event(args.request_id, args.event, args.item)
    print(f"{settings.model_name}: {args.event} on {args.item} logged for {args.request_id}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from recsys.rollback import rollback

    settings = _settings_for(args)
    if args.complete_pending:
        return _complete_pending(settings)
    record = rollback(settings, args.reason, to_version=args.to)
    print(
        f"{settings.model_name} rolled back from v{record['from_version']} "
        f"to v{record['to_version']}: {args.reason}"
    )
    return 0


def _complete_pending(settings: Settings) -> int:
    """Replay the registry updates of rollbacks that switched Triton while MLflow was down."""
    from recsys.rollback import complete_pending_rollback, pending_rollbacks

    pending = pending_rollbacks(settings)
    if not pending:
        print(f"{settings.model_name}: no rollback has a pending registry update")
        return 0
    completed = complete_pending_rollback(settings)  # MLflow still down: raises, exit 3
    for record in completed:
        print(
            f"{settings.model_name}: registry updated for the rollback from "
            f"v{record['from_version']} to v{record['to_version']} "
            f"(pending since {str(record['pending_since'])[:19].replace('T', ' ')} UTC)"
        )
    return 0


# -- status / audit / query -------------------------------------------------------------------


def _replicas(args: argparse.Namespace) -> int:
    """``recsys replicas status|sync``: exit 3 when a replica cannot be reached (status), 1 when
    one could not be brought to the champion (sync)."""
    from recsys.deploy import replica_versions, sync_replicas

    settings = _settings_for(args)
    model = settings.model_name
    if args.replicas_command == "sync":
        result = sync_replicas(settings)
        if result.get("note"):
            print(f"{model}: nothing to sync ({result['note']})")
            return 0
        for name, state in result["replicas"].items():
            detail = f" (served {state['was']})" if state["state"] == "synced" else ""
            detail = f" ({state['error']})" if state["state"] == "unreachable" else detail
            print(f"  {name:<24} {state['state']}{detail}")
        print(f"{model}: champion v{result['champion']} on every reachable replica")
        return 0
    versions = replica_versions(settings)
    unreachable = False
    print(f"{model} on {len(versions)} Triton replica(s):")
    for name, served in versions.items():
        if isinstance(served, str):
            unreachable = True
            print(f"  {name:<24} {served}")
        else:
            print(f"  {name:<24} {', '.join(f'v{v}' for v in served) or 'nothing loaded'}")
    return EXIT_UNAVAILABLE if unreachable else 0


def _status(args: argparse.Namespace) -> int:
    from recsys.operations import platform_status

    settings = _settings_for(args)
    report = platform_status(settings)
    print("stack services:")
    if report.services_error:
        print(f"  unknown ({report.services_error})")
    elif report.services:
        _print_services(report.services)
    else:
        print("  none started by `recsys stack up` on this machine")
    print(f"Triton ({settings.triton_grpc_url}), model {settings.model_name}:")
    if report.triton_error:
        print(f"  UNREACHABLE: {report.triton_error}")
    else:
        versions = ", ".join(f"v{v}" for v in report.triton_versions or []) or "none"
        print(f"  loaded versions: {versions}")
    if report.rollout or report.rollout_error:
        print(f"  rollout: {report.rollout or 'unreadable: ' + str(report.rollout_error)}")
    print(f"MLflow registry ({settings.mlflow_tracking_uri}):")
    if report.registry_error:
        print(f"  UNREACHABLE: {report.registry_error}")
    else:
        for alias, version in (report.aliases or {}).items():
            print(f"  {alias:<9} {f'v{version}' if version is not None else '-'}")
    print("recent audit records:")
    if report.audit_error:
        print(f"  unreadable: {report.audit_error}")
    for line in _audit_table(report.audit, header=False) or ["  none"]:
        print(line)
    return 0 if report.healthy else EXIT_UNAVAILABLE


def _record_versions(record: dict[str, Any]) -> str:
    if "from_version" in record:
        return f"v{record['from_version']}->v{record.get('to_version')}"
    if record.get("version") is not None:
        return f"v{record['version']}"
    return "-"


def _record_detail(record: dict[str, Any]) -> str:
    if record.get("reason"):
        detail = str(record.get("error") or record["reason"])
    elif record.get("action") == "deploy":
        replaced = record.get("replaced")
        detail = f"replaced v{replaced}" if replaced is not None else "first deploy"
    else:
        detail = str(record.get("title", ""))
    return detail.splitlines()[0][:80] if detail else ""


def _audit_table(records: list[dict[str, Any]], header: bool = True) -> list[str]:
    lines = []
    if header and records:
        lines.append(
            f"  {'time (UTC)':<19} {'action':<15} {'model':<24} {'versions':<9} "
            f"{'actor':<24} detail"
        )
    for record in records:
        ts = str(record.get("ts", ""))[:19].replace("T", " ")
        lines.append(
            f"  {ts:<19} {record.get('action', '?'):<15} {record.get('model', '?'):<24} "
            f"{_record_versions(record):<9} {str(record.get('actor', '?'))[:24]:<24} "
            f"{_record_detail(record)}"
        )
    return lines


def _audit(args: argparse.Namespace) -> int:
    from recsys.audit import read_records

    records = read_records(load_settings().audit_log, args.model)
    if args.action:
        records = [r for r in records if r.get("action") in set(args.action)]
    if args.limit:
        records = records[-args.limit :]
    if args.json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
        return 0
    print("\n".join(_audit_table(records)) if records else "no audit records match")
    return 0


def _drift(args: argparse.Namespace) -> int:
    from recsys.monitoring.drift import check_query_drift

    settings = load_settings()
    # Looks only: consuming the sample is the query_drift DAG's job.
    verdict = check_query_drift(settings, args.model, args.version, commit=False)
    if args.json:
        print(json.dumps(verdict, sort_keys=True, default=str))
        return 0
    version = f"v{verdict['version']}" if verdict["version"] is not None else "-"
    state = {True: "DRIFT", False: "no drift"}[verdict["drift"]]
    state = state if verdict["judged"] else "NOT JUDGED"
    print(f"{verdict['model']} {version}: {state} ({verdict['queries']} sampled queries)")
    for reason in verdict["reasons"]:
        print(f"  - {reason}")
    stats = verdict.get("stats") or {}
    for key in (
        "token_length_psi",
        "word_length_psi",
        "oov_rate",
        "reference_oov_rate",
        "unk_rate",
        "reference_unk_rate",
        "centroid_shift",
    ):
        if stats.get(key) is not None:
            print(f"  {key:<20} {stats[key]:.4f}")
    return 0


def _version_titles(settings: Settings, version: int | None) -> tuple[dict[str, str], str]:
    """``({product_id: title}, "")`` from the served version's folder, or ``({}, why not)``.

    Every export writes the catalogue titles into ``products.npz``; folders exported before
    that have ids and embeddings only, and a query must still answer with ids then.
    """
    import numpy as np

    if version is None:
        return {}, "Triton did not say which version answered"
    path = settings.triton_repo / settings.model_name / str(version) / "products.npz"
    if not path.is_file():
        return {}, f"{path} is not on this machine"
    with np.load(path, allow_pickle=False) as products:
        if "titles" not in products.files:
            return {}, f"v{version} was exported without titles ({path} has none)"
        ids, titles = products["ids"], products["titles"]
    return dict(zip((str(i) for i in ids), (str(t) for t in titles), strict=True)), ""


def _query(args: argparse.Namespace) -> int:
    """Search the served model and show each hit with the title from the folder of the
    version that answered (titles of another version could name other products)."""
    from recsys.triton.control import TritonControl

    settings = _settings_for(args)
    with TritonControl(settings.triton_grpc_url) as control:
        hits, version = search_answered(control, settings.model_name, args.text, args.top_k)
    titles, missing = _version_titles(settings, version)
    answered = f"v{version}" if version is not None else "version unknown"
    print(f"{settings.model_name} {answered}: {args.text!r}")
    if missing:
        print(f"product titles unavailable: {missing}; showing ids", file=sys.stderr)
    for rank, (product_id, score) in enumerate(hits, 1):
        title = titles.get(product_id, "")
        print(f"{rank:>3}. {product_id:<10} {score:.4f}  {title}".rstrip())
    return 0


def _percent(value: str) -> float:
    """A share of traffic in percent, 0-100."""
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {value!r}") from exc
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f"a percentage is within 0-100, got {number:g}")
    return number


def _percent_steps(value: str) -> list[float]:
    """Ascending canary weights in percent, e.g. ``5,25,50,100``."""
    steps = [_percent(part) for part in value.split(",") if part.strip()]
    if not steps or steps != sorted(steps) or steps[0] <= 0:
        raise argparse.ArgumentTypeError(f"steps must be ascending percentages > 0, got {value!r}")
    return steps


def _item_ids(value: str) -> list[str]:
    """A comma-separated list of item ids, oldest first (``11,52,7``)."""
    items = [part.strip() for part in value.split(",")]
    if not value.strip() or not all(items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated item ids like 11,52,7, got {value!r}"
        )
    return items


def _recommend(args: argparse.Namespace) -> int:
    """Ask the served recommender for a user's (or an anonymous session's) next items and show
    each with its category; say when the answer is the popularity fallback."""
    import dataclasses

    from recsys.config import family_model_name
    from recsys.families.recommend.client import recommend
    from recsys.triton.control import TritonControl

    settings = load_settings()
    model = args.model or family_model_name("recommend")
    settings = dataclasses.replace(settings, model_name=model)
    with TritonControl(settings.triton_grpc_url) as control:
        answer = recommend(
            control,
            model,
            user=args.user,
            history=args.history,
            top_k=args.top_k,
            exclude_seen=not args.include_seen,
        )
    who = f"user {args.user!r}" if args.user is not None else f"session {args.history}"
    answered = f"v{answer.version}" if answer.version is not None else "version unknown"
    print(f"{model} {answered}: {who} ({answer.source})")
    for rank, (item, score, category) in enumerate(answer.items, 1):
        print(f"{rank:>3}. {item:<12} {score:9.4f}  category {category or '-'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from recsys.demo import run_demo

    return run_demo(
        load_settings(), max_rows=args.max_rows, max_steps=args.max_steps, max_users=args.max_users
    )


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    stack_cmd = sub.add_parser("stack", help="start, stop or inspect the local stack")
    stack_cmd.add_argument("action", choices=["up", "down", "status"])
    stack_cmd.add_argument(
        "--executor",
        choices=["local", "celery"],
        default=None,
        help="up: Airflow's executor; celery adds a Redis broker and one worker per queue "
        "(training, serving, monitoring) (default $RECSYS_AIRFLOW_EXECUTOR, else local)",
    )
    stack_cmd.set_defaults(func=_stack)

    data = sub.add_parser("data", help="data-quality tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    validate = data_sub.add_parser("validate", help="run the GX gate on a relevance CSV")
    validate.add_argument("path", help="relevance CSV (id, product_uid, product_title, ...)")
    validate.add_argument(
        "--suite",
        action="append",
        help="expectation suite to run (repeatable; default: products, queries, relevance_labels)",
    )
    validate.add_argument("--out", help="report folder (default: $RECSYS_HOME/quality/...)")
    validate.set_defaults(func=_data_validate)

    train = sub.add_parser("train", help="trigger a model pipeline on the running stack")
    train.add_argument(
        "--family",
        choices=["search", "recommend"],
        default="search",
        help="which pipeline: search_model_pipeline or recommend_model_pipeline",
    )
    train.add_argument("--data", help="the data export (default: the family's env variable)")
    train.add_argument("--max-users", type=int, help="recommend: only the first N users")
    train.add_argument("--base-model", default=None, help="'minilm' or a local HF model folder")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int, help="stop after N optimiser steps (0 = all)")
    train.add_argument("--max-rows", type=int, help="use only the first N rows (0 = all)")
    train.add_argument(
        "--profile",
        choices=PROFILE_NAMES,
        help="search: a named param set: 'cpu' (about an hour on 2 cores) or 'gpu'",
    )
    train.add_argument(
        "--retrieval", choices=RETRIEVAL_MODES, help="search: serve dense or hybrid retrieval"
    )
    train.add_argument("--unpause", action="store_true", help="unpause the DAG if it is paused")
    train.add_argument("--wait", action="store_true", help="follow the run until it ends")
    train.set_defaults(func=_train)

    deploy = sub.add_parser("deploy", help="serve an already-registered version")
    deploy.add_argument("--version", type=_version_number, required=True)
    deploy.add_argument(
        "--smoke-request",
        type=_json_object,
        default=None,
        help='smoke question as JSON, e.g. \'{"user": "A1"}\' (default: the one the export '
        "recorded)",
    )
    deploy.add_argument("--smoke-query", type=_query_text, default=None, help="search models")
    deploy.add_argument(
        "--top-k", type=_positive_int, default=None, help="hits the smoke test must return"
    )
    deploy.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    progressive = deploy.add_mutually_exclusive_group()
    progressive.add_argument(
        "--canary", action="store_true", help="roll out step by step behind the router"
    )
    progressive.add_argument(
        "--shadow", type=_percent, default=None, metavar="PERCENT",
        help="mirror PERCENT of traffic to it, answers discarded",
    )  # fmt: skip
    deploy.add_argument(
        "--steps", type=_percent_steps, default=[5.0, 25.0, 50.0, 100.0],
        help="canary weights in percent (default 5,25,50,100)",
    )  # fmt: skip
    deploy.add_argument(
        "--no-analysis", action="store_true",
        help="start the rollout without its DAG (move it with `recsys canary`)",
    )  # fmt: skip
    deploy.add_argument(
        "--analysis", type=_json_object, default=None,
        help='more rollout DAG params as JSON, e.g. \'{"window_s": 10, "windows_per_step": 1}\'',
    )  # fmt: skip
    knobs = deploy.add_argument_group(
        "serving knobs",
        "pinned into the version when it is published (default: the benchmarked ones, "
        "2 instances on 2 CPUs / batch 32 / 2000 us / 1 thread, or RECSYS_TRITON_*)",
    )
    knobs.add_argument(
        "--instances", type=_serving_knob("instance_count"), default=None, metavar="N",
        help="Triton model instances (default: CPU count, at most 4)",
    )  # fmt: skip
    knobs.add_argument(
        "--max-batch-size", type=_serving_knob("max_batch_size"), default=None, metavar="N",
        help="largest batch Triton forms (default 32)",
    )  # fmt: skip
    knobs.add_argument(
        "--dynamic-batching", action=argparse.BooleanOptionalAction, default=None,
        help="batch concurrent requests (default: on)",
    )  # fmt: skip
    knobs.add_argument(
        "--max-queue-delay-us", type=_serving_knob("max_queue_delay_us"), default=None,
        metavar="US", help="how long a request may wait to be batched (default 2000)",
    )  # fmt: skip
    knobs.add_argument(
        "--intra-op-threads", type=_serving_knob("intra_op_threads"), default=None,
        metavar="N", help="ONNX Runtime threads per instance (default 1)",
    )  # fmt: skip
    deploy.set_defaults(func=_deploy)

    canary = sub.add_parser("canary", help="the rollout under way: status, weight, promote, abort")
    canary.add_argument("action", choices=["status", "weight", "promote", "abort"])
    canary.add_argument("percent", type=_percent, nargs="?", help="weight: the candidate's share")
    canary.add_argument("--reason", default="by hand (recsys canary)")
    canary.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    canary.set_defaults(func=_canary)

    experiment = sub.add_parser("experiment", help="A/B experiment: start, status, stop")
    experiment.add_argument("action", choices=["start", "status", "stop"])
    experiment.add_argument("--version", type=_version_number, default=None)
    experiment.add_argument("--split", type=_percent, default=50.0, help="percent to candidate")
    experiment.add_argument("--minutes", type=float, default=60.0, help="how long it runs")
    experiment.add_argument(
        "--sample-size", type=int, default=0, help="end at this many impressions (0: time only)"
    )
    experiment.add_argument(
        "--promote-if-better", action="store_true",
        help="promote a candidate that is significantly better",
    )  # fmt: skip
    experiment.add_argument(
        "--analysis", type=_json_object, default=None, help="more rollout DAG params as JSON"
    )
    experiment.add_argument("--reason", default="stopped by hand (recsys experiment stop)")
    experiment.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    experiment.set_defaults(func=_experiment, smoke_request=None)

    feedback = sub.add_parser("feedback", help="log a click or purchase on a routed answer")
    feedback.add_argument("--request-id", required=True)
    feedback.add_argument("--event", choices=["click", "purchase"], default="click")
    feedback.add_argument("--item", required=True, help="the product or item clicked")
    feedback.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    feedback.set_defaults(func=_feedback)

    rollback = sub.add_parser("rollback", help="return to the previous known-good version")
    target = rollback.add_mutually_exclusive_group()
    target.add_argument("--to", type=_version_number, default=None, help="version to return to")
    target.add_argument(
        "--complete-pending",
        action="store_true",
        help="only replay the registry updates of rollbacks done while MLflow was down",
    )
    rollback.add_argument("--reason", default="manual rollback (recsys rollback)")
    rollback.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    rollback.set_defaults(func=_rollback)

    replicas = sub.add_parser(
        "replicas", help="what each Triton replica serves; load the champion where missing"
    )
    replicas_sub = replicas.add_subparsers(dest="replicas_command", required=True)
    for name, helptext in (
        ("status", "what every replica (RECSYS_TRITON_REPLICAS) serves of the model"),
        ("sync", "load the champion on every replica that does not serve it"),
    ):
        command = replicas_sub.add_parser(name, help=helptext)
        command.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
        command.set_defaults(func=_replicas)

    status = sub.add_parser("status", help="services, served versions, aliases, audit")
    status.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    status.set_defaults(func=_status)

    audit = sub.add_parser("audit", help="print deploy and rollback records")
    audit.add_argument(
        "--model", type=_model_name, default=None, help="only this model (default: all)"
    )
    audit.add_argument("--action", action="append", help="only this action (repeatable)")
    audit.add_argument("--limit", type=int, default=0, help="only the last N records")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(func=_audit)

    drift = sub.add_parser("drift", help="judge the sampled served queries against training")
    drift.add_argument(
        "--model", type=_model_name, default=None, help="model (default: RECSYS_MODEL_NAME)"
    )
    drift.add_argument(
        "--version", type=_version_number, default=None, help="default: the serving one"
    )
    drift.add_argument("--json", action="store_true", help="print the verdict as JSON")
    drift.set_defaults(func=_drift)

    query = sub.add_parser("query", help="search the served model")
    query.add_argument("text", type=_query_text, help="what a shopper would type")
    query.add_argument("--top-k", type=_positive_int, default=10)
    query.add_argument("--model", type=_model_name, default=None, help=MODEL_HELP)
    query.set_defaults(func=_query)

    recommend = sub.add_parser("recommend", help="ask the served recommender")
    asked = recommend.add_mutually_exclusive_group(required=True)
    asked.add_argument("--user", type=_query_text, help="a known (or new) user id")
    asked.add_argument(
        "--history", type=_item_ids, help="an anonymous session's item ids, oldest first"
    )
    recommend.add_argument("--top-k", type=_positive_int, default=10)
    recommend.add_argument(
        "--include-seen", action="store_true", help="also recommend items already interacted with"
    )
    recommend.add_argument(
        "--model",
        type=_model_name,
        default=None,
        help="served recommender (default: RECSYS_RECOMMEND_MODEL_NAME or item_recommender)",
    )
    recommend.set_defaults(func=_recommend)

    demo = sub.add_parser("demo", help="end-to-end demo on the running stack")
    demo.add_argument("--max-rows", type=int, default=4000)
    demo.add_argument("--max-steps", type=int, default=40)
    demo.add_argument(
        "--max-users", type=int, default=3000, help="recommender shoppers (0 = skip it)"
    )
    demo.set_defaults(func=_demo)
    return parser


def exit_code_for(exc: BaseException) -> int:
    """2 for bad input, 3 for an unreachable service, 1 for any other failure."""
    import requests

    from recsys.registry import RegistryUnavailableError
    from recsys.triton.control import TritonUnavailableError
    from recsys.triton.replicas import ReplicaDiscoveryError

    unavailable = (
        TritonUnavailableError,
        ReplicaDiscoveryError,
        RegistryUnavailableError,
        requests.ConnectionError,
        requests.Timeout,
        ConnectionError,
    )
    if isinstance(exc, unavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ValueError | FileNotFoundError | IsADirectoryError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(
        filter(
            None,
            (
                args.command,
                getattr(args, "data_command", None),
                getattr(args, "replicas_command", None),
            ),
        )
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"recsys {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a CLI reports failures as one clear line, not a traceback
        print(f"recsys {command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
