"""Each experiment script in its reduced configuration: it runs, writes its files, its numbers are sane."""

import csv
import json
import os

import numpy as np
import pytest
import torch

import mallowspo_fast as mpf
from experiments import bandit, dispersion_vs_truth, tiny_lm


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dispersion_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dispersion")
    return out, dispersion_vs_truth.main(["--quick", "--out", str(out)])


@pytest.fixture(scope="module")
def bandit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bandit")
    return out, bandit.main(["--quick", "--out", str(out)])


def test_dispersion_script_writes_its_files(dispersion_run):
    out, _ = dispersion_run
    for name in ("results.md", "summary.json", "points.csv", "phi_link_check.csv", "estimate_vs_truth.png"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "summary.json") as fh:
        assert json.load(fh)["config"]["quick"] is True


def test_dispersion_estimate_ranks_prompts_like_the_truth(dispersion_run):
    _, result = dispersion_run
    by_name = {row["estimator"]: row for row in result["summary"]}
    for name in ("sequence", "per_choice", "top_choice"):
        # The exact estimators are monotone in φ for a fixed number of items.
        assert by_name[name]["spearman_within_n_min"] == pytest.approx(1.0)
        assert by_name[name]["spearman_pooled"] > 0.8
        assert by_name[name]["phi_star_fit"] > 0
    assert by_name["sequence_sampled"]["spearman_pooled"] > 0.5


def test_dispersion_per_choice_column_is_the_library_estimator(dispersion_run):
    out, _ = dispersion_run
    row = _read_csv(out / "points.csv")[3]
    n, phi = int(row["n"]), float(row["phi"])
    h = float(dispersion_vs_truth.mallows.sequence_entropy(n, phi)) / n
    h_t = torch.tensor([h], dtype=torch.float64)
    c = mpf.neg_log_dispersion(h_t, h_t, n, phi_star=1.0)
    assert float(row["per_choice"]) == pytest.approx(float(torch.exp(-c)), rel=1e-12)


def test_phi_link_check_agrees_with_exact_marginals(dispersion_run):
    _, result = dispersion_run
    assert result["phi_link_max_abs_err"] < 1e-10


def test_bandit_script_writes_its_files(bandit_run):
    out, _ = bandit_run
    for name in ("results.md", "summary.json", "per_seed.csv", "frontier.csv", "frontier.png"):
        assert os.path.getsize(out / name) > 0, name


def test_bandit_numbers_are_sane(bandit_run):
    out, result = bandit_run
    cfg = bandit.CONFIGS["quick"]
    rows = _read_csv(out / "per_seed.csv")
    assert len(rows) == cfg["seeds"] * len(cfg["regimes"]) * len(bandit.METHODS)
    for row in rows:
        assert 0.0 <= float(row["reward"]) <= 1.0
        assert float(row["kl"]) >= 0.0
        assert float(row["regret"]) > -1e-3  # nothing beats the frontier (up to its interpolation)
        assert 0.0 <= float(row["heldout_accuracy"]) <= 1.0
    assert result["spearman_c_hat"]["mean"] > 0  # the noisy estimator still ranks prompts
    assert 0.5 < result["heldout_ceiling"]["mean"] <= 1.0


def test_bandit_true_dispersion_beats_dpo_with_infinite_data(bandit_run):
    # The population fixed point of MallowsPO-θ with the true c(x) lies on the reward–KL frontier and
    # DPO's does not (its temperature varies with c(x)); even the short quick budget shows it.
    out, _ = bandit_run
    rows = [r for r in _read_csv(out / "per_seed.csv") if r["regime"] == "infinite data"]
    regret = {m: np.mean([float(r["regret"]) for r in rows if r["method"] == m]) for m in bandit.METHODS}
    assert regret["theta_true"] < regret["dpo"]
    assert regret["phi_true"] < regret["dpo"]


def test_bandit_population_pairs_are_a_distribution():
    cfg = bandit.CONFIGS["quick"]
    world = bandit.make_world(cfg, np.random.default_rng(0))
    pairs = bandit.population_pairs(world)
    per_prompt = np.bincount(pairs["x"], weights=pairs["weight"])
    np.testing.assert_allclose(per_prompt, np.ones(cfg["prompts"]), atol=1e-12)


def test_bandit_sampled_labels_follow_the_mallows_pair_marginal():
    cfg = {**bandit.CONFIGS["quick"], "prompts": 1, "c_min": 0.7, "c_max": 0.7}
    world = bandit.make_world(cfg, np.random.default_rng(4))
    pairs = bandit.sample_pairs(world, 20_000, np.random.default_rng(5))
    gap = world["rank"][0, pairs["l"]] - world["rank"][0, pairs["w"]]  # > 0: the truly better arm won
    d1 = np.abs(gap) == 1
    expected = float(bandit.mallows.pair_prob(1, world["phi"][0]))
    assert np.mean(gap[d1] > 0) == pytest.approx(expected, abs=0.02)


def _fake_reference_cache(folder, n=40, vocab=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = {
        "chosen_logps": -torch.rand(n, generator=gen) * 50,
        "rejected_logps": -torch.rand(n, generator=gen) * 50,
        "chosen_entropy": torch.rand(n, generator=gen) * np.log(vocab),
        "rejected_entropy": torch.rand(n, generator=gen) * np.log(vocab),
        "chosen_num_tokens": torch.randint(1, 30, (n,), generator=gen),
        "rejected_num_tokens": torch.randint(1, 30, (n,), generator=gen),
        "vocab_size": torch.tensor(vocab),
    }
    table["rejected_num_tokens"][0] = 0  # an empty response: left out of the histogram
    os.makedirs(folder, exist_ok=True)
    torch.save(table, os.path.join(folder, "reference_train.pt"))
    small = {k: (v[:5] if v.ndim else v) for k, v in table.items()}
    torch.save(small, os.path.join(folder, "reference_eval.pt"))
    return table


def test_tiny_lm_dispersion_reads_the_training_table_with_auto_phi_star(tmp_path):
    table = _fake_reference_cache(tmp_path)
    disp = tiny_lm.dispersion_of(str(tmp_path))
    assert disp["c"].shape == (39,)
    assert disp["c"].mean() == pytest.approx(1.0, rel=1e-6)  # φ* auto: mean c(x) = 1 over non-empty pairs
    e = 0.5 * (table["chosen_entropy"][1:].double() + table["rejected_entropy"][1:].double()) / np.log(64)
    np.testing.assert_allclose(disp["e"], e.numpy(), rtol=1e-12)


def test_tiny_lm_summary_pairs_methods_by_seed():
    runs = [{"method": m, "seed": s, "eval_rewards/accuracies": acc, "eval_rewards/margins": 0.1 * acc,
             "eval_loss": 0.6}
            for s, base in enumerate([0.5, 0.6, 0.55])
            for m, acc in zip(tiny_lm.METHODS, [base, base + 0.05, base - 0.01])]
    table, tests = tiny_lm.summarise(runs)
    assert [row["loss_type"] for row in table] == list(tiny_lm.METHODS)
    theta = next(t for t in tests if t["metric"] == "eval_rewards/accuracies" and "θ" in t["comparison"])
    assert theta["mean_diff"] == pytest.approx(0.05)
    assert theta["n_seeds"] == 3


def test_tiny_lm_missing_cache_is_an_explicit_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference cache"):
        tiny_lm.dispersion_of(str(tmp_path))


def test_tiny_lm_quick_end_to_end(tmp_path):
    result = tiny_lm.main(["--quick", "--seeds", "2", "--out", str(tmp_path / "out")])
    assert len(result["table"]) == 3 and len(result["tests"]) == 4
    for row in _read_csv(tmp_path / "out" / "runs.csv"):
        assert 0.0 <= float(row["eval_rewards/accuracies"]) <= 1.0
        assert np.isfinite(float(row["eval_loss"]))
    assert (tmp_path / "out" / "tiny_lm.png").stat().st_size > 0
