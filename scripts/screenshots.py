#!/usr/bin/env python
"""Regenerate the README's screenshots (``docs/images/*.png``) from a real browser session.

The pictures are taken by the browser tests themselves (``tests/test_browser.py``: one stack,
the Airflow trigger form, a finished and a failed run, the monitor's verdict, the MLflow
registry before and after a rollback), so what the README shows is exactly what the tests
checked. This script only points them at ``docs/images`` and keeps each PNG small enough to
commit. It starts its own stack on free ports and needs Debian's ``chromium`` and
``chromium-driver`` (``scripts/setup.sh`` installs them)::

    .venv/bin/python scripts/screenshots.py          # a few minutes on 2 cores
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
MAX_BYTES = 300 * 1024
"""Above this a screenshot is reduced to a 256-colour palette (UI pages lose nothing visible)."""


def shrink(path: Path, max_bytes: int = MAX_BYTES) -> int:
    """Rewrite ``path`` as an optimised PNG, palette-reduced when still over ``max_bytes``;
    returns its size."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > max_bytes:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path.stat().st_size


def main() -> int:
    IMAGES.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RECSYS_SCREENSHOT_DIR": str(IMAGES)}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "browser", "tests/test_browser.py"]
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code != 0:
        print("browser tests failed: docs/images may be partly updated", file=sys.stderr)
        return code
    for path in sorted(IMAGES.glob("*.png")):
        print(f"{path.relative_to(ROOT)}: {shrink(path) // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
