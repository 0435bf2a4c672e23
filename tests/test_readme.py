"""The README stays true to the code: config reference, quick-start targets, public names."""

from __future__ import annotations

import re
from pathlib import Path

import mallowspo_fast as mpf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_lists_every_key_with_its_default() -> None:
    import json

    from mallowspo_fast.trainer.config import describe_fields

    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| [^|]+(?:\\\|[^|]+)* \| `([^`]*)` \|", README,
                                                          re.MULTILINE)}
    missing = [name for _, name, *_ in describe_fields() if name not in rows]
    assert not missing, f"README config reference lacks {missing}"
    wrong = {name: (rows[name], default) for _, name, _, default, _ in describe_fields()
             if json.loads(rows[name]) != json.loads(default)}
    assert not wrong, f"README config reference has stale defaults (README, code): {wrong}"


def test_quick_start_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    targets = re.findall(r"^make (\w[\w-]*)", quick, re.MULTILINE)
    assert targets[:2] == ["demo", "test"], targets
    for t in targets:
        assert re.search(rf"^{re.escape(t)}:", makefile, re.MULTILINE), f"make {t} is in README but not in Makefile"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_public_names_in_readme_exist() -> None:
    names = set(re.findall(r"mpf\.(\w+)\(", README))
    assert names, "README shows no mpf.* call"
    missing = sorted(n for n in names if not hasattr(mpf, n))
    assert not missing, f"README calls mpf.{missing} which the package does not export"
