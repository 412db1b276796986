"""How the platform's Airflow tasks share one executor: pools, priorities, queues, CPU niceness.

The monitor and its rollback must get a worker slot within seconds whatever else runs, and on
the embedded stack (LocalExecutor, a couple of cores) training can otherwise hold every slot for
an hour. Airflow's own mechanisms do the isolation, and every DAG takes its numbers from here:

* **Pools cap everything that is not monitoring.** The executor runs ``parallelism`` tasks at
  once; the pipeline's tasks share the ``training`` pool and the drift check and any other task
  the ``default_pool``, and the slots of those two pools add up to less than ``parallelism``.
  So at least :data:`RESERVED_MONITORING_SLOTS` executor slots are always free for the
  ``monitoring`` pool, whatever training does. Deferred tasks do not hold pool slots (pools are
  created with ``include_deferred: false``): the metrics watch waits in the triggerer.
* **Priority weights** (absolute) put a scheduled rollback ahead of every other waiting task
  when slots do free up.
* **Queues** name where a task belongs on an executor that has queues (CeleryExecutor: one
  worker per queue, ``monitoring`` never behind ``training``); LocalExecutor ignores them.
  Every task of every DAG names one of :data:`QUEUES`: the pipelines' data, training,
  evaluation and export tasks ``training`` (the GPU worker), their register / deploy /
  promotion tasks and a rollout's ``start`` ``serving``, and the monitor's watch and rollback,
  a rollout's analysis and ``finish`` and the drift checks ``monitoring``. Deferred tasks
  (the watch, the analysis) wait in the triggerer whatever their queue; the queue decides the
  worker they start and resume on. ``recsys stack up --executor celery`` runs one worker per
  queue (:func:`worker_concurrency`, ``serving``'s worker also takes Airflow's ``default``
  queue).
* **CPU niceness**: on one machine, training shares the cores with Triton, the scheduler, the
  triggerer and the rollback. Pipeline tasks lower their own CPU priority
  (``RECSYS_TRAINING_NICE``, default 10), so the kernel runs those first when cores are busy.

``deploy/airflow/pools.json`` holds the pools (the embedded stack and the compose file import
it), and :func:`executor_parallelism` the executor size that matches it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from recsys.config import PROJECT_ROOT

log = logging.getLogger(__name__)

POOLS_FILE = PROJECT_ROOT / "deploy" / "airflow" / "pools.json"

TRAINING_POOL = "training"
MONITORING_POOL = "monitoring"
DEFAULT_POOL = "default_pool"

TRAINING_QUEUE = "training"
SERVING_QUEUE = "serving"
MONITORING_QUEUE = "monitoring"
QUEUES = (TRAINING_QUEUE, SERVING_QUEUE, MONITORING_QUEUE)
"""Every queue a platform task may name (Celery: one worker each)."""
AIRFLOW_DEFAULT_QUEUE = "default"
"""Airflow's ``[operators] default_queue``: where a task without a queue goes (a DAG someone
adds by hand); the ``serving`` worker takes it too, so such a task still runs."""

MONITORING_PRIORITY = 1000
"""Priority weight of the monitor's tasks (rollback first among everything waiting)."""
ROLLOUT_PRIORITY = 500
"""Priority of a rollout's tasks: above drift checks and training, below the monitor. A rollout's
abort does not need the monitor's reserved slots: its analysis cuts the candidate's traffic in
the triggerer, and the ``finish`` task only unloads and records."""
DRIFT_PRIORITY = 100
TRAINING_PRIORITY = 1
WEIGHT_RULE = "absolute"
"""Weights as given: the default rule sums downstream weights, which would rank a long pipeline's
first task above a rollback."""

RESERVED_MONITORING_SLOTS = 2
"""Executor slots nothing but the monitoring pool can take: one per monitored model's rollback
(bi-encoder and reranker) running at the same time."""


def worker_concurrency(path: Path = POOLS_FILE) -> dict[str, int]:
    """Task slots of each queue's Celery worker: ``training`` as many as the training pool
    (the pool, not the worker, caps training, as on LocalExecutor), ``serving`` two (a deploy
    and a rollout handoff side by side) and ``monitoring`` the reserved monitoring slots (one
    rollback per monitored model at the same time)."""
    return {
        TRAINING_QUEUE: pool_slots(path)[TRAINING_POOL],
        SERVING_QUEUE: 2,
        MONITORING_QUEUE: RESERVED_MONITORING_SLOTS,
    }


NICE_ENV = "RECSYS_TRAINING_NICE"
DEFAULT_TRAINING_NICE = 10


def pool_slots(path: Path = POOLS_FILE) -> dict[str, int]:
    """``{pool: slots}`` from the pools file (Airflow's ``airflow pools import`` format)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {name: int(entry["slots"]) for name, entry in data.items()}


def executor_parallelism(path: Path = POOLS_FILE) -> int:
    """Executor slots for the pools file: every capped pool's slots plus the reserved ones.

    The capped pools (all but ``monitoring``) can never fill the executor, so the monitoring
    pool always finds :data:`RESERVED_MONITORING_SLOTS` free slots."""
    slots = pool_slots(path)
    capped = sum(count for name, count in slots.items() if name != MONITORING_POOL)
    return capped + RESERVED_MONITORING_SLOTS


def training_nice() -> int:
    """The niceness increment pipeline tasks apply to themselves (``RECSYS_TRAINING_NICE``)."""
    raw = os.environ.get(NICE_ENV, "").strip()
    if not raw:
        return DEFAULT_TRAINING_NICE
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{NICE_ENV}={raw!r} is not an integer (0-19)") from exc
    if not 0 <= value <= 19:
        raise ValueError(f"{NICE_ENV}={raw!r} must be within 0-19")
    return value


def lower_cpu_priority() -> int:
    """Make the calling process (a pipeline task) nicer by ``RECSYS_TRAINING_NICE``, at most up
    to that niceness (idempotent: a second call in the same process changes nothing). Returns
    the niceness now in effect."""
    target = training_nice()
    current = os.nice(0)
    if current < target:
        current = os.nice(target - current)
        log.info(
            "batch task: CPU niceness %d (serving, monitoring and rollback come first)", current
        )
    return current
