"""Airflow DAG: interactions -> GX gate -> SASRec vs baselines -> MLflow -> ONNX -> Triton.

Thin wiring only: the DAG is the platform's generic pipeline
(:func:`recsys.model_pipeline.pipeline_dag`) over the recommendation family.
"""

from __future__ import annotations

from recsys.model_pipeline import pipeline_dag
from recsys.scheduling import route_pipeline_tasks

# Register, deploy and the rollout handoff run on the `serving` queue, the rest on `training`.
route_pipeline_tasks(pipeline_dag("recommend"))
