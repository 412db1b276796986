"""Progress bars for long loops (fine-tuning steps, embedding batches, pipeline tasks).

Bars go to stderr and only when a person is watching: in Airflow task logs, CI output or piped
commands a redrawn bar is noise, so they are off unless stderr is a terminal.
``RECSYS_PROGRESS=0`` turns them off everywhere, ``RECSYS_PROGRESS=1`` forces them on.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


def progress_enabled() -> bool:
    """Whether bars should be drawn now (see the module docstring for the rule)."""
    setting = os.environ.get("RECSYS_PROGRESS", "").strip().lower()
    if setting in {"0", "false", "no", "off"}:
        return False
    if setting in {"1", "true", "yes", "on"}:
        return True
    return sys.stderr.isatty()


def progress_bar(*, total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that draws nothing when :func:`progress_enabled` says no."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )
