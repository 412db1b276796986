"""Airflow DAG: interactions -> GX gate -> SASRec vs baselines -> MLflow -> ONNX -> Triton.

Thin wiring only: the DAG is the platform's generic pipeline
(:func:`recsys.model_pipeline.pipeline_dag`) over the recommendation family.
"""

from __future__ import annotations

from recsys.model_pipeline import pipeline_dag

pipeline_dag("recommend")
