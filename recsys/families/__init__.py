"""Model families: one subpackage per kind of model, all behind :class:`.base.ModelFamily`.

A family is found by name: ``recsys.families.<name>`` must expose ``FAMILY``. The platform learns
which family a served version belongs to from its manifest (``family``), so adding a family is
adding a folder. Manifests written before families existed carry no ``family``: they are
:data:`LEGACY_FAMILY` versions (the only kind the platform served then).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import cache
from typing import Any

from recsys.families.base import ModelFamily

LEGACY_FAMILY = "search"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class UnknownFamilyError(ValueError):
    """A family name that names no installed family package."""


def available() -> list[str]:
    """The names of the installed families (subpackages that expose ``FAMILY``)."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if info.ispkg and _NAME.match(info.name)
    )


@cache
def get_family(name: str) -> ModelFamily:
    """The :class:`ModelFamily` called ``name``; :class:`UnknownFamilyError` when there is
    none (the message lists the installed ones)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name not in available():
        raise UnknownFamilyError(
            f"unknown model family {name!r}; installed: {', '.join(available())}"
        )
    family = getattr(importlib.import_module(f"{__name__}.{name}"), "FAMILY", None)
    if not isinstance(family, ModelFamily) or family.name != name:
        raise UnknownFamilyError(f"recsys.families.{name} exposes no ModelFamily named {name!r}")
    return family


def family_of(manifest: dict[str, Any]) -> ModelFamily:
    """The family a manifest was exported by (``family``; :data:`LEGACY_FAMILY` if absent)."""
    return get_family(manifest.get("family") or LEGACY_FAMILY)


def served_models() -> dict[str, tuple[str, ...]]:
    """Every family's served models, as suffixes of its model name (e.g. search serves
    ``""`` and ``"_reranker"``): each gets its own monitor DAG, thresholds, aliases and
    rollbacks."""
    return {name: get_family(name).served_model_suffixes for name in available()}


def monitor_dag_id(family: str, suffix: str) -> str:
    """``triton_monitor`` + ``_<family>`` (not for the legacy family, whose DAG ids predate
    families) + ``suffix``."""
    return "triton_monitor" + ("" if family == LEGACY_FAMILY else f"_{family}") + suffix


def drift_dag_id(family: str) -> str:
    """``query_drift`` for the legacy family (its id predates families), else
    ``input_drift_<family>``."""
    return "query_drift" if family == LEGACY_FAMILY else f"input_drift_{family}"


def rollout_dag_id(family: str, suffix: str) -> str:
    """``rollout`` + ``_<family>`` (not for the legacy family, like its monitor) + ``suffix``."""
    return "rollout" + ("" if family == LEGACY_FAMILY else f"_{family}") + suffix
