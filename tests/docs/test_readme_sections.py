"""The README's integration and reliability sections stay true: imported names exist, and their figures
are the ones in the code, the committed benchmark run and the reliability page."""

from __future__ import annotations

import importlib
import re

from docs_helpers import DOCS, README, read

from mallowspo_fast.trainer.faults import SAVE_POINTS


def _section(title: str) -> str:
    text = read(README)
    assert f"## {title}\n" in text, f"README has no section {title!r}"
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_integration_examples_import_names_that_exist() -> None:
    imports = re.findall(r"^from (mallowspo_fast\.integrations\.\w+) import (.+)$", _section(
        "Using the kernels from TRL, OpenRLHF and verl"), re.M)
    expected = ("trl", "trl_head", "openrlhf", "verl")
    assert {m for m, _ in imports} == {f"mallowspo_fast.integrations.{n}" for n in expected}
    for module, names in imports:
        mod = importlib.import_module(module)
        missing = [n.strip() for n in names.split(",") if not hasattr(mod, n.strip())]
        assert not missing, f"README imports {missing} from {module}, which it does not define"


def test_integration_figures_are_the_committed_run() -> None:
    results = read(DOCS / "results" / "benchmarks" / "trl_step_cpu" / "results.md")
    m = re.search(r"ours \(sigmoid\) vs TRL \(sigmoid\): time ([\d.]+)×, extra peak memory ([\d.]+)×", results)
    assert m, "the committed trl_step run has no ours-vs-TRL line"
    section = _section("Using the kernels from TRL, OpenRLHF and verl")
    assert f"takes {m.group(1)}× TRL's time and {m.group(2)}× its extra peak memory" in section


def test_reliability_figures() -> None:
    section = _section("Reliability")
    assert f"at each of the {len(SAVE_POINTS)} points of a\ncheckpoint save" in section
    total = re.search(r"^\| \*\*total\*\* \| \*\*([\d,]+) / [\d,]+\*\* \|", read(DOCS / "reliability.md"), re.M)
    assert total, "docs/reliability.md has no fuzz total row"
    assert f"and {total.group(1)} generated inputs per run" in section
