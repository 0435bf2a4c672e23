"""The README stays a short, true front page: the two-command quick start, CI, length.

The rest of the README and the docs (commands, figures, config reference, API entries, links) is
checked by tests/docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_quick_start_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    targets = re.findall(r"^make (\w[\w-]*)", quick, re.MULTILINE)
    assert targets[:2] == ["demo", "test"], targets
    for t in targets:
        assert re.search(rf"^{re.escape(t)}:", makefile, re.MULTILINE), f"make {t} is in README but not in Makefile"


def test_ci_runs_lint_docs_and_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    steps = re.findall(r"^make (\w[\w-]*)", ci, re.MULTILINE)
    assert "test" in steps and "lint" in steps and "docs" in steps, steps
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs:.*\n\t.*mkdocs build --strict", makefile, re.MULTILINE), "make docs must build strictly"


def test_readme_is_a_short_front_page() -> None:
    lines = README.splitlines()
    assert len(lines) <= 250, f"README has {len(lines)} lines; move detail to docs/"
    for section in ("## Quick start", "## Headline figures", "## Train with our trainer",
                    "## Call the op from your own code", "## Run the benchmark suite on a new GPU", "## Documentation"):
        assert section in README, f"README lost its section {section!r}"
    assert "make docs" in README
