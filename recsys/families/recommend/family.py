"""The recommendation family's side of :class:`recsys.families.base.ModelFamily`.

Serving contract (a version folder; :mod:`.export` writes it, :mod:`.serving_model` serves it):

* ``sasrec.onnx``: ``HISTORY`` int64 ``[B, max_len]`` (left-padded tokens: item index + 1,
  0 = padding) -> ``SCORES`` float32 ``[B, n_items]``.
* ``items.npz``: ``item_ids`` (index -> the shop's item id), ``categories``, ``popularity``
  (train interaction counts, the fallback ranking).
* ``users.npz``: the known users, their latest ``max_len`` item tokens and every item they
  interacted with (for ``exclude_seen``).
* ``manifest.json``: ``family: "recommend"``, ``onnx_file``, ``max_len``, limits, the
  ``smoke_request`` and, optionally, ``fault_injection``.
* ``interaction_reference.json`` (optional): what the drift check compares served requests with.

Triton inputs: ``USER_ID`` (string, optional), ``HISTORY`` (strings, optional: an anonymous
session's recent item ids, oldest first), ``TOP_K`` (int32), ``EXCLUDE_SEEN`` (bool,
optional, default true). Outputs: ``ITEM_IDS``, ``SCORES``, ``CATEGORIES`` and ``SOURCE``
(``user``, ``session`` or ``popularity``, with why, e.g. an unknown user).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recsys.families.base import ModelFamily, UnsafeFileNameError

ONNX_FILE = "sasrec.onnx"
ITEMS_FILE = "items.npz"
USERS_FILE = "users.npz"
REFERENCE_FILE = "interaction_reference.json"


class RecommendFamily(ModelFamily):
    """User or session -> top-K items, served by :mod:`.serving_model`."""

    name = "recommend"
    default_model_name = "item_recommender"
    required_artifacts = (ONNX_FILE, ITEMS_FILE, USERS_FILE, "manifest.json")
    optional_artifacts = (REFERENCE_FILE,)
    serving_model_source = Path(__file__).resolve().with_name("serving_model.py")
    gate_metric = "ndcg_at_10"
    drift_reference_file = REFERENCE_FILE
    ranked_output = "ITEM_IDS"

    def request_inputs(self, request: dict[str, Any]) -> list[Any]:
        from recsys.families.recommend.client import recommend_inputs

        history = request.get("history")
        return recommend_inputs(
            user=request.get("user"),
            history=None if history is None else [str(i) for i in history],
            top_k=int(request.get("top_k") or 10),
            exclude_seen=bool(request.get("exclude_seen", True)),
        )

    def simulated_shoppers(self, held_out: Path, *, seed: int = 0, **options: Any) -> Any:
        """One shopper per user of an interaction export, who clicks their held-out next item
        when it is shown (:mod:`.simulated_users`)."""
        from recsys.families.recommend.simulated_users import RecommendShoppers

        return RecommendShoppers.from_interactions(held_out, seed=seed, **options)

    def routing_key(self, request: dict[str, Any]) -> str | None:
        """The user: a known user stays on one arm for the whole rollout (sessions draw)."""
        user = request.get("user")
        return None if user is None else str(user)

    def served_files(self, manifest: dict[str, Any]) -> list[str]:
        name = manifest.get("onnx_file", ONNX_FILE)
        if name != ONNX_FILE:
            raise UnsafeFileNameError(
                f"manifest onnx_file {name!r}: this family serves {ONNX_FILE}"
            )
        return []

    def triton_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return (
            [
                {"name": "USER_ID", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
                {"name": "HISTORY", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
                {"name": "TOP_K", "data_type": "TYPE_INT32", "dims": [1]},
                {"name": "EXCLUDE_SEEN", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
            ],
            [
                {"name": "ITEM_IDS", "data_type": "TYPE_STRING", "dims": [-1]},
                {"name": "SCORES", "data_type": "TYPE_FP32", "dims": [-1]},
                {"name": "CATEGORIES", "data_type": "TYPE_STRING", "dims": [-1]},
                {"name": "SOURCE", "data_type": "TYPE_STRING", "dims": [1]},
            ],
        )

    # -- pipeline stages (recsys.families.recommend.pipeline) ------------------------------

    def pipeline_params(self) -> dict[str, dict[str, Any]]:
        integer = {"type": ["null", "integer"], "minimum": 1}
        return {
            "item_meta_path": {
                "default": "",
                "type": "string",
                "description": "Item metadata (categories, relations); empty = beside the data",
            },
            "max_users": {
                "default": 0,
                "type": "integer",
                "minimum": 0,
                "description": "Use only the first N users by id (0 = all): demo and tests",
            },
            "epochs": {**integer, "default": None, "description": "null = the model default"},
            "sasrec_dim": {
                **integer,
                "default": None,
                "description": "SASRec embedding size; null = the model default",
            },
            "sasrec_max_len": {
                **integer,
                "default": None,
                "description": "Most recent items of a history SASRec reads; null = the default",
            },
            "bpr_epochs": {
                "default": 30,
                "type": "integer",
                "minimum": 1,
                "description": "Epochs of the BPR baseline",
            },
            "negatives_seed": {
                "default": 2024,
                "type": "integer",
                "description": "Seed of the 99 sampled negatives of the HR/NDCG@5/10 protocol",
            },
        }

    def validate(self, data_path: str, run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
        from recsys.families.recommend import pipeline

        return pipeline.validate(data_path, run_dir, params)

    def split(self, validated: dict[str, Any], run_dir: Path, params: dict[str, Any]) -> dict:
        from recsys.families.recommend import pipeline

        return pipeline.make_split(validated, run_dir, params)

    def train(self, split: dict[str, Any], run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
        from recsys.families.recommend import pipeline

        return pipeline.train(split, run_dir, params)

    def evaluate(
        self, split: dict[str, Any], trained: dict[str, Any], run_dir: Path, params: dict
    ) -> dict[str, Any]:
        from recsys.families.recommend import pipeline

        return pipeline.evaluate(split, trained, run_dir, params)

    def export(
        self,
        split: dict[str, Any],
        trained: dict[str, Any],
        run_dir: Path,
        model_name: str,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        from recsys.families.recommend import pipeline

        return pipeline.export(split, trained, run_dir, model_name, params)

    def score_artifacts(
        self, artifacts_dir: Path, split: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, float]:
        from recsys.families.recommend import pipeline

        return pipeline.score(Path(artifacts_dir), split, params)

    # -- drift -----------------------------------------------------------------------------

    def drift_params(self) -> dict[str, dict[str, Any]]:
        share = {"type": ["null", "number"], "exclusiveMinimum": 0, "maximum": 1}
        return {
            "max_unknown_user_share": dict(share),
            "max_unknown_item_share": dict(share),
            "max_popularity_psi": {"type": ["null", "number"], "exclusiveMinimum": 0},
        }

    def drift_check(
        self, version_dir: Path, samples: list[Any], thresholds: Any, limits: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """Unknown users, unknown items and the popularity shift of the sampled requests
        (:mod:`.drift`); ``limits`` override :class:`.drift.RecommendDriftLimits`."""
        import json

        from recsys.families.recommend.drift import RecommendDriftLimits, judge

        reference = json.loads((version_dir / REFERENCE_FILE).read_text())
        return judge(reference, samples, RecommendDriftLimits.with_overrides(limits))

    def registry_onnx_file(self, manifest: dict[str, Any]) -> str:
        return ONNX_FILE

    def smoke_test(
        self,
        control: Any,
        model_name: str,
        version: int,
        manifest: dict[str, Any],
        request: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Recommend once (``{"user": ...}`` or ``{"history": [...]}``, plus ``top_k``) and
        insist on a well-formed, personalised answer (see :func:`.client.smoke_check`)."""
        from recsys.families.recommend.client import smoke_check

        request = dict(request or {})
        base = dict(manifest.get("smoke_request") or {})
        if "user" in request or "history" in request:  # an override replaces who is asked
            base.pop("user", None)
            base.pop("history", None)
        request = {**base, **request}
        answer = smoke_check(control, model_name, request, version=version)
        return [[item, float(score), category] for item, score, category in answer.items[:3]]


FAMILY = RecommendFamily()
