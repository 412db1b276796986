"""`recsys` command line: run the stack, the demo, and inspect the audit trail.

recsys stack up|down|status     start/stop/inspect Triton, MLflow and Airflow on loopback
recsys demo                     stack up -> train+deploy -> query -> fault -> rollback
recsys query "cordless drill"   ask the served model over gRPC
recsys audit                    print the deploy/rollback audit trail
"""

from __future__ import annotations

import argparse
import json
import sys

from recsys.config import load_settings


def _stack(args: argparse.Namespace) -> int:
    from recsys import stack

    settings = load_settings()
    if args.action == "up":
        print(f"starting the stack (state in {settings.home})")
        stack.up(settings)
        _print_status(settings)
        print(f"\nAirflow login: {stack.AIRFLOW_USER} / {stack.airflow_password(settings)}")
    elif args.action == "down":
        stack.down(settings)
    else:
        _print_status(settings)
    return 0


def _print_status(settings) -> None:
    from recsys import stack

    for row in stack.status(settings):
        state = "healthy" if row["healthy"] else ("running" if row["pid"] else "stopped")
        print(f"  {row['service']:<22} {state:<8} pid={row['pid'] or '-':<8} {row['endpoint']}")


def _query(args: argparse.Namespace) -> int:
    from recsys.triton.control import TritonControl

    settings = load_settings()
    hits = TritonControl(settings.triton_grpc_url).search(
        settings.model_name, args.text, args.top_k
    )
    for rank, (product_id, score) in enumerate(hits, 1):
        print(f"{rank:>3}. {product_id:<10} {score:.4f}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from recsys.audit import read_records

    for record in read_records(load_settings().audit_log, args.model):
        print(json.dumps(record, sort_keys=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from recsys.demo import run_demo

    return run_demo(load_settings(), max_rows=args.max_rows, max_steps=args.max_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stack_cmd = sub.add_parser("stack", help="start, stop or inspect the local stack")
    stack_cmd.add_argument("action", choices=["up", "down", "status"])
    stack_cmd.set_defaults(func=_stack)
    query = sub.add_parser("query", help="search the served model")
    query.add_argument("text")
    query.add_argument("--top-k", type=int, default=10)
    query.set_defaults(func=_query)
    audit = sub.add_parser("audit", help="print deploy and rollback records")
    audit.add_argument("--model", default=None)
    audit.set_defaults(func=_audit)
    demo = sub.add_parser("demo", help="end-to-end demo on the running stack")
    demo.add_argument("--max-rows", type=int, default=4000)
    demo.add_argument("--max-steps", type=int, default=40)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a CLI reports failures as one clear line, not a traceback
        print(f"recsys {args.command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
