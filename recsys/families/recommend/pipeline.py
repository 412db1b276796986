"""The recommendation family's pipeline stages, as the generic pipeline calls them.

Each stage takes and returns small JSON-able dicts (Airflow XComs) and keeps its bulk in the run
folder. The split is not stored: :func:`load_split` recomputes it from the gate's clean file
(the time-ordered leave-one-out split is deterministic and takes about a second on 120k rows),
so every stage sees exactly the same users, items and held-out cases without a pickle between
tasks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.config import PROJECT_ROOT

log = logging.getLogger(__name__)

DATA_ENV = "RECSYS_RECOMMEND_DATA_PATH"
ITEM_META_ENV = "RECSYS_RECOMMEND_ITEM_META"
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "amazon_grocery" / "train.csv"
CLEAN_FILE = "interactions_clean.csv"
CHECKPOINT_FILE = "sasrec.pt"
NEGATIVES_SEED = 2024


def default_data_path() -> Path:
    """``RECSYS_RECOMMEND_DATA_PATH``, else the Amazon Grocery export beside the checkout."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else DEFAULT_DATA


def default_item_meta(data_path: Path) -> Path | None:
    """``RECSYS_RECOMMEND_ITEM_META``, else ``item_meta.*`` beside the interactions (None when
    there is none: the catalogue check and categories are then skipped)."""
    value = os.environ.get(ITEM_META_ENV)
    if value:
        return Path(value).expanduser()
    for name in ("item_meta.csv", "item_meta.tsv"):
        candidate = data_path.parent / name
        if candidate.is_file():
            return candidate
    return None


def validate(data_path: str, run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Read the interaction export strictly, run the interactions suite (ids, time range,
    duplicates, users with too few interactions, items unknown to the catalogue), quarantine
    bad rows and write the clean rows; stop on a failed critical check."""
    from recsys.data import frame_fingerprint
    from recsys.families.recommend.data import catalogue_items, read_interactions, read_item_meta
    from recsys.families.recommend.suite import validate_interactions

    path = Path(data_path) if data_path else default_data_path()
    frame = read_interactions(path)
    max_users = int(params.get("max_users") or 0)
    if max_users:
        # A slice of whole users (the first N by id), never of rows: a user cut in half would
        # change what is held out. Used by the demo and the tests to keep runs short.
        keep = sorted(frame["user_id"].dropna().astype(str).unique())[:max_users]
        frame = frame[frame["user_id"].isin(keep)]
    meta_param = params.get("item_meta_path") or ""
    meta_path = Path(meta_param) if meta_param else default_item_meta(path)
    catalogue = None
    if meta_path is not None:
        catalogue = catalogue_items(read_item_meta(meta_path))
    report = validate_interactions(frame, run_dir / "quality", catalogue=catalogue)
    clean_path = run_dir / CLEAN_FILE
    report.clean.to_csv(clean_path, index=False)
    log.info(
        "interaction quality: %d rows in, %d clean, %d quarantined; report %s",
        len(frame),
        len(report.clean),
        len(report.quarantined),
        report.report_dir,
    )
    return {
        "clean_path": str(clean_path),
        "data_path": str(path),
        "item_meta_path": str(meta_path) if meta_path is not None else None,
        "data_hash": frame_fingerprint(frame),
        "rows": len(frame),
        "quality": report.to_summary(),
    }


def load_split(split: dict[str, Any]):
    """The :class:`.split.LeaveOneOutSplit` of a run (recomputed from its clean file)."""
    from recsys.families.recommend.split import leave_one_out

    frame = pd.read_csv(split["clean_path"], dtype={"user_id": str, "item_id": str})
    return leave_one_out(frame)


def load_item_meta(split: dict[str, Any]) -> pd.DataFrame | None:
    from recsys.families.recommend.data import read_item_meta

    path = split.get("item_meta_path")
    return read_item_meta(path) if path else None


def make_split(validated: dict[str, Any], run_dir: Path, params: dict[str, Any]) -> dict:
    """Time-ordered leave-one-out: each user's last interaction is the test case, the one
    before it validation, the rest train."""
    info = {
        "clean_path": validated["clean_path"],
        "item_meta_path": validated.get("item_meta_path"),
    }
    split = load_split(info)
    return {
        **info,
        "users": split.n_users,
        "items": split.n_items,
        "train_rows": len(split.train),
        "test_cases": len(split.test),
        "train_only_users": len(split.train_only_users),
    }


def sasrec_params(params: dict[str, Any]):
    """The :class:`.sasrec.SASRecParams` named by the DAG params (``sasrec_<field>`` or the
    field name itself, e.g. ``epochs``), defaults for the rest."""
    from recsys.families.recommend.sasrec import SASRecParams

    values = {}
    for field in fields(SASRecParams):
        for key in (f"sasrec_{field.name}", field.name):
            if params.get(key) is not None:
                values[field.name] = params[key]
                break
    return SASRecParams(**values)


def train(split_info: dict[str, Any], run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Fit the sequential model (GPU with mixed precision when present) and save it."""
    import torch

    from recsys.families.recommend.sasrec import SASRec

    split = load_split(split_info)
    model = SASRec(sasrec_params(params), item_meta=load_item_meta(split_info)).fit(split)
    checkpoint = run_dir / CHECKPOINT_FILE
    torch.save(
        {"state": model.net.state_dict(), "params": asdict(model.params), "n_items": split.n_items},
        checkpoint,
    )
    return {"checkpoint": str(checkpoint), "summary": model.describe()}


def load_model(split, checkpoint: str, item_meta: pd.DataFrame | None = None):
    """The fitted :class:`.sasrec.SASRec` of ``checkpoint`` over ``split`` (on the CPU), its
    relation table rebuilt from ``item_meta`` as the fit built it."""
    import torch

    from recsys.families.recommend.sasrec import SASRec, SASRecNet, SASRecParams

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    params = SASRecParams(**{**saved["params"], "device": "cpu"})
    model = SASRec(params, item_meta=item_meta)
    model._index(split)
    model.device = torch.device("cpu")
    model.net = SASRecNet(saved["n_items"], params, model.relations)
    model.net.load_state_dict(saved["state"])
    model.net.eval()
    return model


def evaluate(
    split_info: dict[str, Any], trained: dict[str, Any], run_dir: Path, params: dict[str, Any]
) -> dict[str, Any]:
    """The model and every baseline (popularity, item-kNN, BPR) on the same held-out cases,
    both protocols: sampled (1 + 99 seeded negatives; HR/NDCG@5/10) and full ranking
    (Recall/NDCG@20)."""
    from recsys.families.recommend.baselines import BPR, ItemKNN, Popularity
    from recsys.families.recommend.evaluate import build_cases, evaluate_both, sample_negatives

    split = load_split(split_info)
    cases = build_cases(split, "test")
    negatives = sample_negatives(
        cases, 99, seed=int(params.get("negatives_seed") or NEGATIVES_SEED)
    )
    train_matrix = split.train_matrix()
    model = load_model(split, trained["checkpoint"], load_item_meta(split_info))
    scorers = {
        "sasrec": model.scorer("test"),
        "popularity": Popularity().fit(train_matrix),
        "itemknn": ItemKNN().fit(train_matrix),
        # BPR as tuned on the validation stage (benchmarks/recommend_quality.py): a fair baseline.
        "bpr": BPR(epochs=int(params.get("bpr_epochs") or 30), lr=5e-3, reg=3e-2).fit(train_matrix),
    }
    systems = {}
    for name, scorer in scorers.items():
        systems[name] = evaluate_both(scorer, cases, negatives)
        log.info("%s: %s", name, json.dumps(systems[name]))
    return {"metrics": systems["sasrec"], "systems": systems}


def export(
    split_info: dict[str, Any],
    trained: dict[str, Any],
    run_dir: Path,
    model_name: str,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The version folder Triton serves: ONNX graph, item and user tables, manifest, drift
    reference; scored as served (the folder's ONNX graph) on the test cases."""
    from recsys.families.recommend.export import build_serving_artifacts, score_artifacts

    split = load_split(split_info)
    model = load_model(split, trained["checkpoint"], load_item_meta(split_info))
    artifacts = build_serving_artifacts(
        model,
        split,
        run_dir / "serving",
        item_meta=load_item_meta(split_info),
        fault_injection=params.get("fault_injection"),
    )
    metrics = score_artifacts(artifacts, split, negatives_seed=_negatives_seed(params))
    return {"artifacts_dir": str(artifacts), "metrics": metrics, "precision": "fp32"}


def _negatives_seed(params: dict[str, Any]) -> int:
    return int(params.get("negatives_seed") or NEGATIVES_SEED)


def score(folder: Path, split_info: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """A serving folder's metrics on the run's test cases (the champion gate's yardstick)."""
    from recsys.families.recommend.export import score_artifacts

    return score_artifacts(folder, load_split(split_info), negatives_seed=_negatives_seed(params))
