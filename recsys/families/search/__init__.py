"""Product search: query text in, ranked product ids out (bi-encoder, optional reranker).

One module per stage: ``training`` (bi-encoder), ``reranker`` (cross-encoder), ``evaluation``,
``baselines`` (BM25, the base model), ``export`` and ``quantization`` (the version folder),
``promotion`` (scoring a serving folder), ``drift_reference`` / ``drift_policy`` /
``query_features`` (query drift), and ``pipeline`` / ``pipeline_reranker`` (the tasks of
``search_model_pipeline``); the relevance-data reader is ``recsys.data``. The platform reaches
them only through :data:`FAMILY` (:class:`.family.SearchFamily`). ``serving_model.py`` is the
Triton python-backend model.
"""

from recsys.families.search.family import FAMILY, SearchFamily

__all__ = ["FAMILY", "SearchFamily"]
