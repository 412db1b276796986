"""recsys: the library behind the e-commerce search MLOps platform.

All pipeline logic lives here so that the Airflow DAG files stay thin and every stage can be
tested on its own. One module per stage: data, quality, training, evaluation, registry, export,
triton (server, repository, control), monitoring, rollback, stack.
"""

__version__ = "0.1.0"
