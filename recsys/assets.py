"""Airflow Assets the platform's DAGs exchange.

One Asset so far: the request to retrain the search model. The ``query_drift`` DAG emits an
event on it when served queries have drifted from the training data, and
``search_model_pipeline`` is scheduled on it (besides its time schedule, see
:func:`recsys.config.pipeline_schedule`). Its URI names no run-specific model: the pipeline
trains whatever ``RECSYS_MODEL_NAME`` says, and a fixed URI keeps producer and consumer matched
whatever environment parses the DAG files.
"""

from __future__ import annotations

from airflow.sdk import Asset

RETRAINING_REQUEST_URI = "recsys://product_search/retraining-request"
RETRAINING_REQUEST = Asset(uri=RETRAINING_REQUEST_URI, name="product_search_retraining_request")
