"""The documentation site builds with ``mkdocs build --strict`` (what ``make docs`` and CI run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from docs_helpers import ROOT


def test_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    site = tmp_path / "site"
    for page in ("index.html", "op/index.html", "config-reference/index.html", "api/ops/index.html",
                 "api/losses/index.html", "api/data/index.html", "api/trainer/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    # The API reference rendered the docstrings (not just the headings).
    ops = (site / "api" / "ops" / "index.html").read_text(encoding="utf-8")
    assert "sequence_logprobs" in ops and "Raises" in ops and "Returns" in ops
