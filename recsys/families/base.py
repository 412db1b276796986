"""The model-family interface: what the platform asks of a family, and nothing more.

The platform (registry, Triton repository and control, deploy, rollback, monitor, audit, alerts,
drift plumbing) never imports a family module. It reads the ``family`` of a version folder's
``manifest.json`` and asks :func:`recsys.families.get_family` for the :class:`ModelFamily` of
that name, the way ``mlflow.pyfunc`` talks to every flavor through one interface. A new family
is a new folder ``recsys/families/<name>/`` whose ``__init__`` exposes ``FAMILY``, an instance
of a :class:`ModelFamily` subclass; no file elsewhere changes.

What a family provides, by stage:

* **data suite / split / train / evaluate / export** (:meth:`validate`, :meth:`split`,
  :meth:`train`, :meth:`evaluate`, :meth:`export`, :meth:`score_artifacts`): the stages the
  generic pipeline (:mod:`recsys.model_pipeline`) runs. Each takes and returns small JSON-able
  dicts (they travel as Airflow XComs) and writes its bulk to the run folder.
* **serving model**: the python-backend ``model.py`` (:attr:`serving_model_source`), the files
  a version folder must hold (:attr:`required_artifacts`, :meth:`served_files`) and the Triton
  inputs/outputs (:meth:`triton_io`).
* **smoke request**: :meth:`smoke_test` asks a loaded version one question and insists on a
  well-formed answer; the deploy and the rollback call it before any alias moves.
* **registry**: which ONNX graph of a version folder is logged as its MLflow model
  (:meth:`registry_onnx_file`).
* **drift features**: :meth:`drift_check` compares a version's sampled served inputs with the
  reference its export wrote (:attr:`drift_reference_file`).

Why an abstract base class rather than a ``Protocol``: defaults (no optional files, no drift
check) are shared, and a family that forgets a required hook fails at import, not mid-deploy.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

MANIFEST_FILE = "manifest.json"


class UnsafeFileNameError(ValueError):
    """A manifest entry that should name a plain file in the version folder but could be a
    path (separators, a leading dot): a manifest must never point Triton at other files."""


class ManifestError(ValueError):
    """A manifest entry a family cannot use (wrong type, missing field)."""


class ModelFamily(ABC):
    """One kind of model the platform trains and serves (search, recommendation, ...)."""

    name: ClassVar[str]
    """Short name, recorded as ``family`` in every manifest this family exports."""
    default_model_name: ClassVar[str]
    """The served (and registered) model name when the user names none."""
    required_artifacts: ClassVar[tuple[str, ...]]
    """Files every serving-artifacts folder and version folder must hold (``manifest.json``
    included; ``model.py`` is added by the repository)."""
    optional_artifacts: ClassVar[tuple[str, ...]] = ()
    """Published with a version when present, never required to serve it."""
    serving_model_source: ClassVar[Path]
    """The python-backend model, copied into every version folder as ``model.py``. It must
    import only numpy, onnxruntime and the standard library (plus what the family documents),
    never ``recsys``: a version folder must keep working whatever happens to the platform."""
    gate_metric: ClassVar[str]
    """The held-out metric the champion gate compares (higher is better)."""
    served_model_suffixes: ClassVar[tuple[str, ...]] = ("",)
    """The served models of one pipeline run, as suffixes of the model name (search adds
    ``"_reranker"``): each has its own monitor DAG (:func:`recsys.families.monitor_dag_id`)."""
    drift_reference_file: ClassVar[str | None] = None
    """The file in a version folder the drift check compares served inputs with."""
    ranked_output: ClassVar[str | None] = None
    """The output holding the ranked ids (e.g. ``PRODUCT_IDS``): what a routed answer shows
    a shopper, and what shadow mode compares top-k overlap on (:mod:`recsys.delivery`)."""

    # -- serving --------------------------------------------------------------------------

    def served_files(self, manifest: dict[str, Any]) -> list[str]:
        """Files besides :attr:`required_artifacts` that ``manifest`` makes Triton load. Plain
        file names only: raise :class:`UnsafeFileNameError` for anything that could be a path,
        :class:`ManifestError` for an entry of the wrong shape."""
        return []

    @abstractmethod
    def triton_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(inputs, outputs)`` of the Triton model config, in protobuf-JSON form
        (``{"name": ..., "data_type": "TYPE_...", "dims": [...]}``)."""

    @abstractmethod
    def registry_onnx_file(self, manifest: dict[str, Any]) -> str:
        """The ONNX file of a version folder that is logged as its MLflow model."""

    @abstractmethod
    def smoke_test(
        self,
        control: Any,
        model_name: str,
        version: int,
        manifest: dict[str, Any],
        request: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Ask ``version`` of ``model_name`` (pinned) one question through ``control`` (a
        :class:`recsys.triton.control.TritonControl`) and return a short JSON-able summary of
        the answer (for the audit record). ``request`` overrides the default question, which
        the export recorded in ``manifest["smoke_request"]``. Raise
        :class:`recsys.triton.control.ModelLoadError` for an error or a malformed answer."""

    def request_inputs(self, request: dict[str, Any]) -> list[Any]:
        """The ``tritonclient.grpc.InferInput`` list of one request given as a dict (the smoke
        request's form, e.g. ``{"query": ..., "top_k": 10}``): how a routed client, the
        traffic of a rollout analysis or a benchmark asks any family's model."""
        raise NotImplementedError(f"{self.name} cannot build a request from a dict")

    def routing_key(self, request: dict[str, Any]) -> str | None:
        """The key that keeps one shopper on one arm of a rollout (e.g. the user id); ``None``
        lets each request draw its arm at random."""
        return None

    def simulated_shoppers(self, held_out: Path, *, seed: int = 0, **options: Any) -> Any:
        """A population of simulated shoppers built from held-out data (``len()``,
        indexing; each with ``request()`` and ``clicks(shown_ids, rng)``), for rollout tests,
        the canary benchmark and the demo (:mod:`recsys.delivery.traffic`)."""
        raise NotImplementedError(f"{self.name} has no simulated shoppers")

    # -- pipeline stages -------------------------------------------------------------------

    def pipeline_params(self) -> dict[str, dict[str, Any]]:
        """Extra params of this family's pipeline DAG: name -> ``Param`` keyword arguments
        (``default`` plus a JSON schema), so the family needs no Airflow import."""
        return {}

    def validate(self, data_path: str, run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
        """Run the family's data suites; quarantine bad rows; raise
        :class:`recsys.quality.DataQualityError` on a failed critical check. Returns at least
        ``clean_path``, ``data_hash``, ``data_path`` and ``quality``."""
        raise NotImplementedError(f"{self.name} has no generic pipeline stage 'validate'")

    def split(self, validated: dict[str, Any], run_dir: Path, params: dict[str, Any]) -> dict:
        """Split the clean data into train / validation / test; return paths and counts."""
        raise NotImplementedError(f"{self.name} has no generic pipeline stage 'split'")

    def train(self, split: dict[str, Any], run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
        """Fit the model; return ``checkpoint`` (a path) and a ``summary`` to log."""
        raise NotImplementedError(f"{self.name} has no generic pipeline stage 'train'")

    def evaluate(
        self, split: dict[str, Any], trained: dict[str, Any], run_dir: Path, params: dict
    ) -> dict[str, Any]:
        """Held-out metrics of the trained model and of the family's baselines, on the same
        cases: ``{"metrics": {...}, "systems": {name: metrics}}``."""
        raise NotImplementedError(f"{self.name} has no generic pipeline stage 'evaluate'")

    def export(
        self,
        split: dict[str, Any],
        trained: dict[str, Any],
        run_dir: Path,
        model_name: str,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        """Write the serving-artifacts folder (ONNX, lookups, ``manifest.json`` with
        ``family``); return ``{"artifacts_dir": ...}``."""
        raise NotImplementedError(f"{self.name} has no generic pipeline stage 'export'")

    def score_artifacts(
        self, artifacts_dir: Path, split: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, float]:
        """Held-out metrics of a serving-artifacts or version folder, computed the way the
        served model computes its answers: the champion gate scores the challenger and the
        champion's published folder with it on the same split."""
        raise NotImplementedError(f"{self.name} cannot score a serving folder")

    # -- drift -----------------------------------------------------------------------------

    def drift_params(self) -> dict[str, dict[str, Any]]:
        """The family's drift limits as DAG params: name -> ``Param`` keyword arguments (a
        JSON schema; the default is always ``None``, meaning "the configured limit")."""
        return {}

    def drift_check(
        self, version_dir: Path, samples: list[Any], thresholds: Any, limits: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """``(stats, reasons)``: statistics of the sampled served inputs (``samples``: what the
        serving model wrote, a query string or a request object each) against the version's
        reference (:attr:`drift_reference_file`), and one reason per breached limit (empty:
        no drift). ``thresholds`` is the platform's
        :class:`recsys.monitoring.drift_thresholds.DriftThresholds` for the model; ``limits``
        overrides the family's own limits (e.g. DAG params)."""
        raise NotImplementedError(f"{self.name} has no drift check")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``manifest.json`` of a serving-artifacts or version folder, as a dict."""
    manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    if not isinstance(manifest, dict):
        raise ValueError(f"{folder}/{MANIFEST_FILE} is not a JSON object")
    return manifest
