"""User -> item recommendation from implicit interactions (issue #11), one module per stage.

* :mod:`.data` reads an interaction export (``user_id, item_id, time``) and the item metadata
  strictly: nothing is cast or dropped, bad cells are recorded for the quality gate.
* :mod:`.suite` builds the Great Expectations suite for interactions and runs it through the
  platform's gate (:func:`recsys.quality.validate_frame`).
* :mod:`.split` makes the time-ordered leave-one-out split and the id -> index mappings.
* :mod:`.evaluate` ranks held-out items with a sampled (1 + 99 negatives) and a full-ranking
  protocol, the same code for every system.
* :mod:`.baselines` holds popularity, item-kNN and BPR matrix factorisation.
* :mod:`.sasrec` is the served model, a self-attentive sequential recommender.
* :mod:`.export` writes a version folder, :mod:`.serving_model` serves it in Triton and
  :mod:`.client` asks it; :mod:`.family` is what the platform sees (:data:`FAMILY`).
"""

from recsys.families.recommend.family import FAMILY, RecommendFamily

__all__ = ["FAMILY", "RecommendFamily"]
