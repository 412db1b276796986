"""Airflow Assets the platform's DAGs exchange: one retraining request per model family.

A family's drift DAG emits an event on its Asset when served inputs have drifted from the
training data, and the family's pipeline is scheduled on it (besides its time schedule, see
:func:`recsys.config.pipeline_schedule`). The URI names no run-specific model: the pipeline
trains whatever the environment names, and a fixed URI keeps producer and consumer matched
whatever environment parses the DAG files. The search family's URI predates families and is
kept, so existing asset events and schedules stay attached.
"""

from __future__ import annotations

from airflow.sdk import Asset

from recsys.families import LEGACY_FAMILY

RETRAINING_REQUEST_URI = "recsys://product_search/retraining-request"
RETRAINING_REQUEST = Asset(uri=RETRAINING_REQUEST_URI, name="product_search_retraining_request")


def retraining_request(family: str) -> Asset:
    """The retraining-request Asset of ``family`` (``recsys://<family>/retraining-request``;
    :data:`RETRAINING_REQUEST` for the search family)."""
    if family == LEGACY_FAMILY:
        return RETRAINING_REQUEST
    return Asset(uri=f"recsys://{family}/retraining-request", name=f"{family}_retraining_request")
