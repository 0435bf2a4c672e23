"""Figures of the science page's part 4 (the generated task) against its committed results.

The same mechanism as ``test_figures.py`` (whose claim matcher this file uses): each claim is a phrase of
docs/science.md with ``{}`` where a number stands and the values, read from docs/results/generated_task/
(or the experiment's code), that those numbers must show at the precision they are written with. The
verbatim tables of part 4 are checked by ``test_figures.test_quoted_tables_are_verbatim_excerpts``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable

import pytest
from docs_helpers import DOCS, RESULTS, md_table, read
from test_figures import _as_float, _claim_regex, _squash, _tolerance, summary

from experiments import generated_task as gt
from experiments import generated_world as gw


def _gen_cfg(key: str):
    return summary("generated_task")["config"][key]


def _gen_method(level: str, method: str, column: str) -> float:
    rows = md_table(RESULTS / "generated_task" / "results.md", "| level | method |")
    return next(float(r[column].split()[0]) for r in rows if r["level"] == level and r["method"] == method)


def _gen_test(level: str, metric: str, method: str) -> dict:
    return next(t for t in summary("generated_task")["tests"]
                if t["level"] == level and t["metric"] == metric and t["comparison"] == f"{method} − dpo")


def _gen_frontier(level: str, method: str, beta: float, column: str) -> float:
    with open(RESULTS / "generated_task" / "frontier.csv", encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f) if r["level"] == level and r["method"] == method
                   and float(r["beta"]) == beta)
    return float(row[column].split()[0])


def _gen_ref(key: str) -> float:
    return summary("generated_task")["reference"][key]["mean"]


def _gen_spearman(prompts: str) -> float:
    return next(float(a["spearman_c_hat_c"].split()[0]) for a in summary("generated_task")["agreement"]
                if a["prompts"] == prompts)


def _gen_share(method: str, metric: str) -> float:
    """Share of the true dispersion's gain over DPO that the estimated one keeps, in percent."""
    return 100 * _gen_test("all", metric, f"{method}_est")["mean_diff"] / _gen_test("all", metric,
                                                                                   f"{method}_true")["mean_diff"]


_GEN_ALL, _GEN_HIGH, _GEN_LOW = "all", "high dispersion (c < 1)", "low dispersion (c ≥ 1)"
_GEN_FAMILIES = gw.FAMILIES


CLAIMS: list[tuple[str, str, Callable[[], list[float]]]] = [
    # README's science line
    ("README.md", "(a tiny transformer reference, {} seeds), MallowsPO-θ/φ with the true dispersion lower DPO's regret "
     "at matched KL from {} to {}/{} and raise its best-β win rate against the reference from {} to {}/{} "
     "(Holm-adjusted sign-flip p = {})",
     lambda: [len(_gen_cfg("seeds"))] + [_gen_method(_GEN_ALL, m, "regret") for m in ("dpo", "theta_true", "phi_true")]
     + [_gen_method(_GEN_ALL, m, "win_rate") for m in ("dpo", "theta_true", "phi_true")]
     + [max(_gen_test(_GEN_ALL, k, m)["p_signflip_holm"] for k in ("regret", "win_rate")
            for m in ("theta_true", "phi_true"))]),
    ("README.md", "(Spearman {} with the truth) keep {}–{}% of the regret gain",
     lambda: [_gen_spearman("overall"), min(_gen_share(m, "regret") for m in ("theta", "phi")),
              max(_gen_share(m, "regret") for m in ("theta", "phi"))]),
    ("README.md", "(win rate there: +{}, Holm p = {})",
     lambda: [_gen_test(_GEN_HIGH, "win_rate", "theta_true")[k] for k in ("mean_diff", "p_signflip_holm")]),
    ("docs/science.md", "python -m experiments.generated_task # {} min in the committed run",
     lambda: [summary("generated_task")["seconds"] / 60]),
    ("docs/science.md", "Four prompt families, {} prompts each (a word-level vocabulary of {} words; each prompt has "
     "{} candidate answers", lambda: [_gen_cfg("prompts_per_family"), len(gw.VOCAB),
                                   gw.K]),
    ("docs/science.md", "| open | pick a colour for the thing07 | 2 shades × 4 of 8 colours | a family-wide taste in "
     "colours | [{}, {}] |", lambda: list(gw.C_RANGE["open"])),
    ("docs/science.md", "| arithmetic | what is 3 plus 4 | the 8 numbers nearest the sum | by distance to the sum | "
     "log-uniform in [{}, {}] |", lambda: list(gw.C_RANGE["arithmetic"])),
    ("docs/science.md", "on the rank scale, ({} − rank)/{}, and 0 for anything outside", lambda: [gw.K - 1, gw.K - 1]),
    ("docs/science.md", "a tiny causal transformer built from a config (width {}, {} layers, {} heads;",
     lambda: [_gen_cfg("model")[k] for k in ("d_model", "n_layers", "n_heads")]),
    ("docs/science.md", "trained by SFT for {} steps on {} sampled answers per prompt, for all {} prompts",
     lambda: [_gen_cfg("sft_steps"), _gen_cfg("sft_samples"), len(gw.FAMILIES) * _gen_cfg("prompts_per_family")]),
    ("docs/science.md", "{} pairs per training prompt on the {} training prompts only",
     lambda: [_gen_cfg("pairs_per_prompt"),
              len(gw.FAMILIES) * (_gen_cfg("prompts_per_family") - _gen_cfg("heldout_per_family"))]),
    ("docs/science.md", "β ∈ {{}, {}, {}, {}}, all initialised at the reference", lambda: _gen_cfg("betas")),
    ("docs/science.md", "({} Adam steps × {} pairs, lr {}; the {} policies of a seed",
     lambda: [_gen_cfg("steps"), _gen_cfg("batch"), _gen_cfg("lr"), len(gt.METHODS) * len(_gen_cfg("betas"))]),
    ("docs/science.md", "**Evaluation** on the {} held-out prompts",
     lambda: [len(gw.FAMILIES) * _gen_cfg("heldout_per_family")]),
    ("docs/science.md", "exact over the {} candidates plus one \"anything else\" outcome", lambda: [gw.K]),
    ("docs/science.md", "over those {} outcomes", lambda: [gw.K + 1]),
    ("docs/science.md", "and the accuracy of the implicit reward's sign on {} held-out labelled pairs per prompt",
     lambda: [_gen_cfg("heldout_pairs")]),
    ("docs/science.md", "its best β. {} seeds ({}–{}); the learning rate",
     lambda: [len(_gen_cfg("seeds")), min(_gen_cfg("seeds")), max(_gen_cfg("seeds"))]),
    ("docs/science.md", "The committed run took {} min on the shared 2-core machine",
     lambda: [summary("generated_task")["seconds"] / 60]),
    ("docs/science.md", "The reference puts {} of its mass off the candidate set and is {} in total variation from the "
     "true answer distributions ({} samples per prompt), with φ* = auto = {}",
     lambda: [_gen_ref("ref_other_mass"), _gen_ref("ref_tv"), _gen_cfg("sft_samples"), _gen_ref("phi_star")]),
    ("docs/science.md", "the true c(x), mean [95% t-CI] over {} seeds:", lambda: [len(_gen_cfg("seeds"))]),
    ("docs/science.md", "Per method and level, mean [95% t-CI] over {} seeds", lambda: [len(_gen_cfg("seeds"))]),
    ("docs/science.md", "the reference's held-out reward is {} overall, {} on the high-dispersion and {} on the "
     "low-dispersion prompts", lambda: [_gen_ref(f"ref_reward {lv}") for lv in (_GEN_ALL, _GEN_HIGH, _GEN_LOW)]),
    ("docs/science.md", "(Spearman {} overall) and within the lookup and recommend families ({}, {}), less well within "
     "arithmetic ({}) and barely within the open family ({}): between c = {} and {}",
     lambda: [_gen_spearman(p) for p in ("overall", "lookup", "recommend", "arithmetic", "open")]
     + list(gw.C_RANGE["open"])),
    ("docs/science.md", "lower the regret at matched KL from DPO's {} to {} and {} and raise the best-β win rate "
     "against the reference from {} to {} and {} (Holm-adjusted sign-flip p = {} for each)",
     lambda: [_gen_method(_GEN_ALL, m, "regret") for m in ("dpo", "theta_true", "phi_true")]
     + [_gen_method(_GEN_ALL, m, "win_rate") for m in ("dpo", "theta_true", "phi_true")]
     + [max(_gen_test(_GEN_ALL, k, m)["p_signflip_holm"] for k in ("regret", "win_rate")
            for m in ("theta_true", "phi_true"))]),
    ("docs/science.md", "the gains shrink to a regret of {} and {} and a win-rate gain of +{} and +{}",
     lambda: [_gen_method(_GEN_ALL, m, "regret") for m in ("theta_est", "phi_est")]
     + [_gen_test(_GEN_ALL, "win_rate", m)["mean_diff"] for m in ("theta_est", "phi_est")]),
    ("docs/science.md", "(the weakest: θ regret, Holm p = {})",
     lambda: [max(_gen_test(_GEN_ALL, k, m)["p_signflip_holm"] for k in ("regret", "win_rate")
                  for m in ("theta_est", "phi_est"))]),
    ("docs/science.md", "has the same best-β win rate as DPO (+{}, Holm p = {}) and no significantly lower regret "
     "({}, Holm p = {}); MallowsPO-φ with the true c likewise (+{}, p = {})",
     lambda: [_gen_test(_GEN_HIGH, "win_rate", "theta_true")[k] for k in ("mean_diff", "p_signflip_holm")]
     + [_gen_test(_GEN_HIGH, "regret", "theta_true")[k] for k in ("mean_diff", "p_signflip_holm")]
     + [_gen_test(_GEN_HIGH, "win_rate", "phi_true")[k] for k in ("mean_diff", "p_signflip_holm")]),
    ("docs/science.md", "of the results file: {} for θ and {} for φ with the true c)",
     lambda: [_gen_test(_GEN_LOW, "regret", m)["mean_diff"] for m in ("theta_true", "phi_true")]),
    ("docs/science.md", "(at β = {} DPO's held-out reward falls to {} from the reference's {}; MallowsPO-θ and -φ with "
     "the true c fall to {} and {})",
     lambda: [0.1, _gen_frontier(_GEN_ALL, "dpo", 0.1, "reward"), _gen_ref(f"ref_reward {_GEN_ALL}")]
     + [_gen_frontier(_GEN_ALL, m, 0.1, "reward") for m in ("theta_true", "phi_true")]),
    ("docs/science.md", "θ with ĉ (+{}, sign-flip p = {}), rests on one seed (the t-test gives p = {})",
     lambda: [_gen_test(_GEN_HIGH, "win_rate", "theta_est")[k] for k in ("mean_diff", "p_signflip_holm", "p_t")]),
    ("docs/science.md", "has the lowest regret at every level ({} overall)", lambda: [_gen_method(_GEN_ALL, "ipo_est",
                                                                                                   "regret")]),
    ("docs/science.md", "(mean KL {} at its smallest β, against {} for DPO)",
     lambda: [_gen_frontier(_GEN_ALL, m, 0.1, "kl") for m in ("ipo_est", "dpo")]),
    ("docs/science.md", "its best-β win rate ({}) matches", lambda: [_gen_method(_GEN_ALL, "ipo_est", "win_rate")]),
    ("docs/science.md", "ahead of DPO in win rate by both tests (+{}, Holm p = {})",
     lambda: [_gen_test(_GEN_HIGH, "win_rate", "ipo_est")[k] for k in ("mean_diff", "p_signflip_holm")]),
    ("docs/science.md", "lowers the regret ({}, Holm p = {}: its heavy tail",
     lambda: [_gen_method(_GEN_ALL, "cauchy", "regret"), _gen_test(_GEN_ALL, "regret", "cauchy")["p_signflip_holm"]]),
    ("docs/science.md", "but not the best-β win rate ({}, p = {})",
     lambda: [_gen_test(_GEN_ALL, "win_rate", "cauchy")[k] for k in ("mean_diff", "p_signflip_holm")]),
    ("docs/science.md", "differs from DPO's by at most {} and only",
     lambda: [max(abs(t["mean_diff"]) for t in summary("generated_task")["tests"] if t["metric"] == "accuracy")]),
    ("docs/science.md", "For a trained LM reference (part 4): {} over prompts of four families, from {} to {} within a "
     "family", lambda: [_gen_spearman("overall"), min(map(_gen_spearman, _GEN_FAMILIES)),
                        max(map(_gen_spearman, _GEN_FAMILIES))]),
    ("docs/science.md", "it keeps {}% (θ) and {}% (φ) of the true dispersion's regret gain over DPO and {}% and {}% of "
     "its win-rate gain", lambda: [_gen_share("theta", "regret"), _gen_share("phi", "regret"),
                                   _gen_share("theta", "win_rate"), _gen_share("phi", "win_rate")]),
]


@pytest.mark.parametrize("page,phrase,values", CLAIMS, ids=[s[:40] for _, s, _ in CLAIMS])
def test_quoted_figure_matches_its_source(page: str, phrase: str, values: Callable[[], list[float]]) -> None:
    text = _squash(read(DOCS.parent / page))
    m = _claim_regex(phrase).search(text)
    assert m, f"{page}: the phrase {phrase!r} is gone (reworded?); keep the figure it quotes checked"
    want, shown = values(), m.groups()
    assert len(shown) == len(want), (phrase, shown, want)
    wrong = [(s, w) for s, w in zip(shown, want) if abs(_as_float(s) - float(w)) > _tolerance(s) + 1e-12]
    assert not wrong, f"{page}: {phrase!r}: shown vs committed value: {wrong}"


def test_generated_task_claims_hold() -> None:
    """Part 4's words: which comparisons are significant, where the gain lies, what is not reproduced."""
    sig = lambda level, metric, m: _gen_test(level, metric, m)["p_signflip_holm"] < 0.05  # noqa: E731
    for m in ("theta_true", "phi_true", "theta_est", "phi_est"):
        assert sig(_GEN_ALL, "regret", m) and _gen_test(_GEN_ALL, "regret", m)["mean_diff"] < 0
        assert sig(_GEN_ALL, "win_rate", m) and _gen_test(_GEN_ALL, "win_rate", m)["mean_diff"] > 0
    assert not sig(_GEN_HIGH, "regret", "theta_true") and not sig(_GEN_HIGH, "win_rate", "theta_true")
    assert not sig(_GEN_HIGH, "win_rate", "phi_true")
    for m in ("theta_true", "phi_true"):  # the gain lies on the clear prompts
        assert _gen_test(_GEN_LOW, "regret", m)["mean_diff"] < _gen_test(_GEN_HIGH, "regret", m)["mean_diff"]
        assert sig(_GEN_LOW, "regret", m)
    assert _gen_test(_GEN_HIGH, "win_rate", "theta_est")["p_t"] >= 0.05 and sig(_GEN_HIGH, "win_rate", "theta_est")
    assert sig(_GEN_HIGH, "win_rate", "ipo_est") and _gen_test(_GEN_HIGH, "win_rate", "ipo_est")["p_t"] < 0.05
    for level in (_GEN_ALL, _GEN_HIGH, _GEN_LOW):
        regrets = {m: _gen_method(level, m, "regret") for m in gt.METHODS}
        assert min(regrets, key=regrets.get) == "ipo_est"
    assert not sig(_GEN_ALL, "win_rate", "cauchy") and sig(_GEN_ALL, "regret", "cauchy")
    significant_accuracy = [(t["level"], t["comparison"]) for t in summary("generated_task")["tests"]
                            if t["metric"] == "accuracy" and t["p_signflip_holm"] < 0.05]
    assert significant_accuracy == [(_GEN_HIGH, "phi_true − dpo")]
    assert _gen_frontier(_GEN_ALL, "ipo_est", 0.1, "kl") == max(
        _gen_frontier(_GEN_ALL, "ipo_est", b, "kl") for b in _gen_cfg("betas"))
    text = _squash(read(DOCS / "science.md"))
    assert "Not reproduced: the gain is on the low-dispersion prompts, not the high-dispersion ones." in text
