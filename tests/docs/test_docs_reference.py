"""The reference parts of the docs stay true: config keys, API entries, links, the demo's description."""

from __future__ import annotations

import difflib
import json
import re
from types import SimpleNamespace

import yaml
from docs_helpers import DOCS, README, ROOT, config_reference_tables, pages, read, rel, resolve

import mallowspo_fast as mpf

CONFIG_REFERENCE = DOCS / "config-reference.md"


def _table_rows(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.startswith(("| `", "**"))]


def test_config_reference_matches_the_dataclass() -> None:
    """Every key with its type, default and meaning, in the dataclass's order and groups, nothing else.
    To refresh: ``python tests/docs/docs_helpers.py config-reference`` prints the tables."""
    want = _table_rows(config_reference_tables())
    have = _table_rows(read(CONFIG_REFERENCE))
    diff = "\n".join(difflib.unified_diff(have, want, "docs/config-reference.md", "the config dataclass", lineterm=""))
    assert have == want, f"the config reference is stale:\n{diff}"


def test_config_reference_defaults_parse_to_the_code_defaults() -> None:
    """Independent of the renderer: each row's default, read as JSON, is the dataclass field's default."""
    import dataclasses

    from mallowspo_fast.trainer.config import TrainConfig

    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (?:[^|\\]|\\\|)+ \| `([^`]*)` \|",
                                                         read(CONFIG_REFERENCE), re.M)}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(rows) == set(fields), (sorted(set(fields) - set(rows)), sorted(set(rows) - set(fields)))
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert json.loads(rows[name]) == default, (name, rows[name], default)


def _api_entries() -> set[str]:
    """Dotted paths of every ``::: path`` entry of the API pages, and the members listed under them."""
    entries: set[str] = set()
    for page in sorted((DOCS / "api").glob("*.md")):
        text = read(page)
        for m in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n|\n)*)", text, re.M):
            entries.add(m.group(1))
            members = re.search(r"members:\n((?:\s+- \w+\n)+)", m.group(2))
            if members:
                entries.update(f"{m.group(1)}.{n}" for n in re.findall(r"- (\w+)", members.group(1)))
    return entries



def test_every_public_name_has_an_api_entry() -> None:
    from mallowspo_fast import data, trainer

    entries = _api_entries()
    by_last = {e.rsplit(".", 1)[-1]: e for e in entries}
    wanted = {f"mallowspo_fast.{n}": n for n in mpf.__all__ if n != "__version__"}
    wanted |= {f"mallowspo_fast.data.{n}": n for n in data.__all__}
    wanted |= {f"mallowspo_fast.trainer.{n}": n for n in trainer.__all__}
    missing = sorted(public for public, name in wanted.items() if name not in by_last)
    assert not missing, f"public names without an API reference entry (`::: ...` in docs/api/): {missing}"
    # ... and each entry documents that very object (not a namesake).
    for public, name in wanted.items():
        assert resolve(by_last[name]) is resolve(public), (public, by_last[name])


def test_api_entriesresolve() -> None:
    for entry in _api_entries():
        resolve(entry)


def test_cli_entry_points_have_api_entries() -> None:
    entries = _api_entries()
    assert {"mallowspo_fast.trainer.cli.main", "mallowspo_fast.data.cli.main"} <= entries, entries


def test_readme_linksresolve() -> None:
    text = read(README)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_links_every_docs_page() -> None:
    """The README's documentation table reaches every page of the site (results pages are reached from those)."""
    text = read(README)
    site_pages = sorted(rel(p) for p in pages()[1:])
    unlinked = [p for p in site_pages if f"({p})" not in text and not p.endswith("index.md")]
    assert not unlinked, f"pages not linked from the README: {unlinked}"


def test_every_docs_page_is_in_the_nav() -> None:
    nav_text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*([\w/-]+\.md)\s*$", nav_text, re.M))
    site_pages = {str(p.relative_to(DOCS)) for p in pages()[1:]}
    assert site_pages - nav == set(), f"pages missing from the mkdocs.yml nav: {sorted(site_pages - nav)}"
    assert nav - site_pages == set(), f"nav entries without a page: {sorted(nav - site_pages)}"


def test_readme_is_short() -> None:
    assert len(read(README).splitlines()) <= 250


def test_demo_description_matches_the_embedded_default() -> None:
    from mallowspo_fast.trainer.demo import demo_defaults

    d = demo_defaults()
    with open(ROOT / "configs" / "demo.yaml", encoding="utf-8") as f:
        written = yaml.safe_load(f)
    assert {k: v for k, v in written.items() if k != "dataset_name"} == {
        k: v for k, v in d.items() if k != "dataset_name"}, "configs/demo.yaml is not the embedded default"
    training = read(DOCS / "training.md")
    mc = d["model_config"]
    assert f"trains a {d['tokenizer_vocab_size']}-token byte-level BPE tokenizer" in training
    assert f"(hidden {mc['hidden_size']}, {mc['num_hidden_layers']} layers, tied embeddings)" in training
    assert mc["tie_word_embeddings"] is True
    assert f"runs {d['sft_warmup_steps']} steps of SFT" in training
    assert f"{round(d['eval_ratio'] * 100)}% held out for evaluation" in training
    assert f"for {d['num_train_epochs']} epochs" in training
    assert d["loss_type"] == "mallows_theta" and d["phi_star"] == "auto" and d["zero_stage"] == 3


def test_demo_model_size_is_as_described() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mallowspo_fast.trainer.demo import demo_defaults

    d = demo_defaults()
    mc = dict(d["model_config"])
    config = AutoConfig.for_model(mc.pop("model_type"), vocab_size=d["tokenizer_vocab_size"], **mc)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert f"A {n / 1e6:.1f}M-parameter model" in read(DOCS / "training.md")


def test_demo_summary_shape_is_what_the_cli_prints() -> None:
    from mallowspo_fast.trainer.demo import demo_defaults, format_summary

    d = demo_defaults()
    metrics = {"loss": 0.5, "rewards/accuracies": 0.5, "rewards/margins": 0.5, "dispersion/neg_log_mean": 1.0,
               "dispersion/neg_log_std": 0.1, "dispersion/entropy_mean": 0.8}
    result = SimpleNamespace(
        stopped_by=None, step=99, total_steps=99, seconds=40.0, train_metrics=metrics,
        eval_metrics={"eval_loss": 0.9, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.1},
        eval_examples=30, phi_star=6.0, model_dir="outputs/demo", checkpoint_dir="outputs/demo/checkpoint-99",
        metrics_path="outputs/demo/logs/metrics.jsonl", curves_path="outputs/demo/training_curves.png")
    cfg = SimpleNamespace(loss_types=[d["loss_type"]], beta=d["beta"], phi_star=d["phi_star"], **{
        k: v for k, v in d.items() if k not in ("loss_type", "beta", "phi_star")})
    printed = format_summary(result, cfg).strip("\n").split("\n")
    shown = re.search(r"Its summary has this shape[^\n]*\n\n```\n(.*?)```", read(DOCS / "training.md"), re.S)
    assert shown, "training.md lost the demo summary block"
    shown_lines = shown.group(1).rstrip("\n").split("\n")
    number = re.compile(r"(?<![\w/-])\d+(?:\.\d+)?(?![\w/-])")
    keep = {"99/99", "0.1"}

    def shape(line: str) -> str:
        return number.sub(lambda m: m.group(0) if m.group(0) in keep else "…", line)

    assert [shape(x) for x in printed] == [shape(x) for x in shown_lines]


def test_eleven_formats() -> None:
    from mallowspo_fast.data import PAIRED_FORMATS, UNPAIRED_FORMATS

    n = len(PAIRED_FORMATS) + len(UNPAIRED_FORMATS)
    words = {11: "eleven"}
    assert f"any of {words.get(n, n)} formats" in read(README)
    rows = re.findall(r"^\| `(\w+)`(?: \([^)]*\))? \| `\{", read(DOCS / "data.md"), re.M)
    assert sorted(rows) == sorted(f.name for f in (*PAIRED_FORMATS, *UNPAIRED_FORMATS)), rows
