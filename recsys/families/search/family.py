"""The search family's side of :class:`recsys.families.base.ModelFamily`."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

from recsys.families.base import ManifestError, ModelFamily, UnsafeFileNameError

DEFAULT_SMOKE_QUERY = "angle bracket"
DEFAULT_SMOKE_TOP_K = 5
DEFAULT_ONNX_FILE = "encoder.onnx"
_ONNX_FILE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\.onnx$")
_JSON_FILE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\.json$")


def served_onnx_file(manifest: dict[str, Any]) -> str:
    """The encoder file the manifest names (``onnx_file``; ``encoder.onnx`` for manifests
    written before INT8 existed). Only a plain ``*.onnx`` file name in the version folder is
    accepted, so a manifest cannot make Triton read a file from elsewhere."""
    name = manifest.get("onnx_file") or DEFAULT_ONNX_FILE
    if not isinstance(name, str) or not _ONNX_FILE.fullmatch(name):
        raise UnsafeFileNameError(f"manifest onnx_file {name!r} is not a plain *.onnx file name")
    return name


class SearchFamily(ModelFamily):
    """Text query -> top-K products: ``QUERY`` / ``TOP_K`` in, ``PRODUCT_IDS`` / ``SCORES``
    out, served by :mod:`.serving_model`."""

    name = "search"
    default_model_name = "product_search"
    required_artifacts = ("encoder.onnx", "tokenizer.json", "products.npz", "manifest.json")
    optional_artifacts = ("query_reference.json",)
    serving_model_source = Path(__file__).resolve().with_name("serving_model.py")
    gate_metric = "ndcg_at_10"
    served_model_suffixes = ("", "_reranker")
    drift_reference_file = "query_reference.json"
    ranked_output = "PRODUCT_IDS"

    def served_files(self, manifest: dict[str, Any]) -> list[str]:
        """The served encoder; with a ``hybrid`` section, the BM25 index files and the fusion
        code (``hybrid.py``); with a ``reranker`` section, the cross-encoder's ONNX graph and
        tokenizer: plain file names only (:class:`UnsafeFileNameError` otherwise)."""
        files = [served_onnx_file(manifest)]
        hybrid = manifest.get("hybrid")
        if hybrid is not None:
            from recsys.families.search.hybrid import HYBRID_FILE, LEXICAL_FILES, FusionConfig

            if not isinstance(hybrid, dict):
                raise ManifestError(f"manifest hybrid must be an object, got {hybrid!r}")
            try:
                FusionConfig.from_dict(hybrid)
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"manifest hybrid section is invalid: {exc}") from exc
            files += [*LEXICAL_FILES, HYBRID_FILE]
        reranker = manifest.get("reranker")
        if reranker is None:
            return files
        if not isinstance(reranker, dict):
            raise ManifestError(f"manifest reranker must be an object, got {reranker!r}")
        for key, pattern in (("onnx_file", _ONNX_FILE), ("tokenizer_file", _JSON_FILE)):
            name = reranker.get(key)
            if not isinstance(name, str) or not pattern.fullmatch(name) or name == "manifest.json":
                raise UnsafeFileNameError(
                    f"manifest reranker {key} {name!r} is not a plain file name"
                )
            files.append(name)
        return list(dict.fromkeys(files))

    def triton_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return (
            [
                {"name": "QUERY", "data_type": "TYPE_STRING", "dims": [1]},
                {"name": "TOP_K", "data_type": "TYPE_INT32", "dims": [1]},
            ],
            [
                {"name": "PRODUCT_IDS", "data_type": "TYPE_STRING", "dims": [-1]},
                {"name": "SCORES", "data_type": "TYPE_FP32", "dims": [-1]},
            ],
        )

    def drift_params(self) -> dict[str, dict[str, Any]]:
        number = {"type": ["null", "number"], "exclusiveMinimum": 0}
        names = ("max_length_psi", "max_oov_rate_increase", "max_unk_rate_increase")
        return {name: dict(number) for name in (*names, "max_centroid_shift")}

    def drift_check(
        self, version_dir: Path, samples: list[Any], thresholds: Any, limits: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """Served queries vs the training queries of ``version_dir``: length PSI, OOV and
        ``[UNK]`` rates, centroid shift, measured with the version's own tokenizer and encoder
        (:mod:`recsys.families.search.drift_policy`); ``thresholds`` hold the limits."""
        from recsys.families.search.drift_policy import drift_reasons, drift_stats
        from recsys.families.search.drift_reference import QueryReference
        from recsys.families.search.query_features import QueryFeaturizer, query_embeddings

        queries = [q for q in samples if isinstance(q, str)]
        reference = QueryReference.load(version_dir / self.drift_reference_file)
        reference.check_encoder(version_dir)
        features = QueryFeaturizer(version_dir / "tokenizer.json").features(queries)
        embeddings = query_embeddings(version_dir, queries, reference.max_query_tokens)
        stats = drift_stats(reference, features, embeddings)
        return stats, drift_reasons(stats, thresholds)

    def request_inputs(self, request: dict[str, Any]) -> list[Any]:
        from recsys.families.search.client import search_inputs

        return search_inputs(str(request["query"]), int(request.get("top_k") or 10))

    def simulated_shoppers(self, held_out: Path, *, seed: int = 0, **options: Any) -> Any:
        """One shopper per held-out query (a relevance CSV, e.g. the pipeline's ``test.csv``)
        who clicks judged products by grade (:mod:`.simulated_users`)."""
        from recsys.families.search.simulated_users import SearchShoppers

        return SearchShoppers.from_csv(held_out, seed=seed, **options)

    def registry_onnx_file(self, manifest: dict[str, Any]) -> str:
        return DEFAULT_ONNX_FILE  # the fp32 encoder: the INT8 one is derived from it

    def smoke_test(
        self,
        control: Any,
        model_name: str,
        version: int,
        manifest: dict[str, Any],
        request: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Search once (``{"query": ..., "top_k": ...}``) and insist on exactly ``top_k``
        non-empty ids with finite, descending scores; returns the top three hits."""
        request = {**(manifest.get("smoke_request") or {}), **(request or {})}
        query = str(request.get("query") or DEFAULT_SMOKE_QUERY)
        top_k = int(request.get("top_k") or DEFAULT_SMOKE_TOP_K)
        hits = smoke_check(control, model_name, query, top_k, version=version)
        return [[pid, float(score)] for pid, score in hits[:3]]


def smoke_check(
    control: Any, model_name: str, query: str, top_k: int = 5, version: int | None = None
) -> list[tuple[str, float]]:
    """Search once and insist on a well-formed answer: exactly ``top_k`` non-empty ids with
    finite, descending scores. Raises :class:`~recsys.triton.control.ModelLoadError`
    otherwise, so a deploy fails before a version that loads but cannot answer becomes
    champion."""
    from recsys.families.search.client import SearchError, search
    from recsys.triton.control import ModelLoadError

    try:
        hits = search(control, model_name, query, top_k, version=version)
    except SearchError as exc:
        raise ModelLoadError(f"smoke test of {model_name} failed: {exc}") from exc
    scores = [score for _, score in hits]
    problems = []
    if len(hits) != top_k:
        problems.append(f"{len(hits)} hits instead of {top_k}")
    if any(not pid for pid, _ in hits):
        problems.append("empty product id")
    if not all(math.isfinite(s) for s in scores):
        problems.append("non-finite score")
    if any(a < b for a, b in itertools.pairwise(scores)):
        problems.append("scores not in descending order")
    if problems:
        raise ModelLoadError(
            f"smoke test of {model_name} query {query!r} returned a malformed answer: "
            f"{'; '.join(problems)}: {hits}"
        )
    return hits


FAMILY = SearchFamily()
