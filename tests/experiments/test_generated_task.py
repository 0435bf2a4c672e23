"""The generated-task experiment: its world, its ensemble LM, its metrics, and the script in --quick mode."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import mallowspo_fast as mpf
from experiments import ensemble_lm as lm
from experiments import generated_task as gt
from experiments import generated_world as gw
from experiments import mallows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The scripts' setting (experiments.common.configure_torch): tiny tensors on a shared CPU run many
    times slower with more threads, which only spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return gw.make_world(12, 4, np.random.default_rng(3))


# ----------------------------------------------------------------------------------------------------
# World


def test_tokenizer_round_trip_and_unknown_word():
    ids = gw.encode("what is 3 plus 4")
    assert gw.decode(ids) == "what is 3 plus 4"
    assert len(set(gw.VOCAB)) == len(gw.VOCAB)
    with pytest.raises(ValueError, match="'five' is not a word"):
        gw.encode("what is five")


def test_world_structure(world):
    p = len(world.prompt)
    assert p == 12 * len(gw.FAMILIES) and world.heldout.sum() == 4 * len(gw.FAMILIES)
    for i in range(p):
        assert sorted(world.rank[i]) == list(range(gw.K))  # a ranking of the candidates
        assert len({tuple(c) for c in world.candidates[i]}) == gw.K
        assert all(c[-1] == gw.EOS_ID for c in world.candidates[i])
        lo, hi = gw.C_RANGE[gw.FAMILIES[world.family[i]]]
        assert lo <= world.c[i] <= hi


def test_central_rankings_follow_the_family_rules(world):
    for i in np.flatnonzero(world.family == gw.FAMILIES.index("arithmetic")):
        words = gw.decode(world.prompt[i]).split()
        total = int(words[2]) + int(words[4])
        answers = [int(gw.VOCAB[world.candidates[i][k][0]]) for k in np.argsort(world.rank[i])]
        assert answers[0] == total
        assert [abs(a - total) for a in answers] == sorted(abs(a - total) for a in answers)
    for i in np.flatnonzero(world.family == gw.FAMILIES.index("lookup")):
        best = world.candidates[i][int(np.argmin(world.rank[i]))]
        assert gw.VOCAB[best[0]] == gw.decode(world.prompt[i]).split()[-1].replace("land", "city")
    # recommend and open share one taste per family: no two prompts order a common pair differently
    for family in ("recommend", "open"):
        before = set()
        for i in np.flatnonzero(world.family == gw.FAMILIES.index(family)):
            ranked = [tuple(world.candidates[i][k]) for k in np.argsort(world.rank[i])]
            before |= {(ranked[a], ranked[b]) for a in range(gw.K) for b in range(a + 1, gw.K)}
        assert not any((b, a) in before for a, b in before)


def test_answer_distribution_is_the_mallows_top_choice(world):
    probs = world.answer_probs()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    i = 5
    by_rank = np.exp(mallows.choice_log_probs(gw.K, world.phi[i]))
    np.testing.assert_allclose(probs[i][np.argsort(world.rank[i])], by_rank, rtol=1e-12)
    # and it matches the exact Mallows model's first place (n = 8 enumerates 40320 rankings)
    perms, w = mallows.exact_distribution(gw.K, float(world.phi[i]))
    np.testing.assert_allclose(np.bincount(perms[:, 0], weights=w, minlength=gw.K), by_rank, atol=1e-12)


def test_pack_aligns_labels_with_the_next_token():
    ids, labels = gw.pack([[5, 6, 7], [8]], [[9, 1], [10, 11, 1]])
    assert ids.tolist() == [[5, 6, 7, 9, 1], [8, 10, 11, 1, 0]]
    assert labels.tolist() == [[-100, -100, 9, 1], [10, 11, 1, -100]]


def test_pair_labels_follow_the_mallows_pair_marginal(world):
    i = int(np.argmin(np.abs(world.c - 0.7)))
    sampler = np.full((len(world.prompt), gw.K), 1.0 / gw.K)
    pairs = gw.preference_pairs(world, np.array([i]), 40_000, sampler, np.random.default_rng(0))
    gap = world.rank[i, pairs["l"]] - world.rank[i, pairs["w"]]  # > 0: the better one won
    assert np.all(pairs["w"] != pairs["l"])
    for d in (1, 3):
        sel = np.abs(gap) == d
        assert np.mean(gap[sel] > 0) == pytest.approx(float(mallows.pair_prob(d, world.phi[i])), abs=0.02)


def test_true_win_probabilities_are_complementary(world):
    win = gw.true_win_prob(world, np.arange(len(world.prompt)))
    np.testing.assert_allclose(win + win.transpose(0, 2, 1), 1.0, atol=1e-12)
    best = int(np.argmin(world.rank[0]))
    assert np.all(np.delete(win[0, best, :gw.K], best) > 0.5)
    assert np.all(win[0, :gw.K, gw.K] == 1.0)


# ----------------------------------------------------------------------------------------------------
# Ensemble LM


def _tiny():
    cfg = lm.TinyLMConfig(vocab_size=len(gw.VOCAB), d_model=16, n_layers=2, n_heads=2, d_ff=24, max_len=10)
    return cfg, lm.init_params(cfg, 0)


def test_sequence_stats_match_a_float64_reference():
    cfg, p = _tiny()
    ids, labels = gw.pack([[2, 3, 40], [11, 8], [5]], [[25, 1], [250, 251, 1], [30, 1]])
    ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
    out = lm.sequence_stats(p, cfg, ids, labels)
    logits = lm.forward({k: v.double() for k, v in p.items()}, cfg, ids)[0, :, :-1]
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.logps[0].double(), (tok * mask).sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy[0].double(), (ent * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=0)
    assert out.num_tokens[0].tolist() == [2, 3, 2]


def test_response_window_covers_exactly_the_response_positions():
    labels = torch.tensor([[-100, -100, 9, 1], [10, 11, 1, -100], [-100, -100, -100, 4]])
    positions, window = lm.response_window(labels)
    assert window.tolist() == [[9, 1, -100], [10, 11, 1], [4, -100, -100]]
    assert positions.tolist() == [[2, 3, 3], [0, 1, 2], [3, 3, 3]]


def test_ensemble_copies_train_independently():
    cfg, p = _tiny()
    params = lm.replicate(p, 3)
    ids, labels = (torch.as_tensor(a) for a in gw.pack([[2, 3], [4, 5]], [[25, 1], [26, 1]]))
    out = lm.sequence_stats(params, cfg, ids, labels)
    (out.logps[1].sum() * 1.0).backward()  # only copy 1's loss
    for name, v in params.items():
        assert v.grad[0].abs().max() == 0 and v.grad[2].abs().max() == 0, name
    assert params["head"].grad[1].abs().max() > 0
    # identical copies compute identical outputs
    torch.testing.assert_close(out.logps[0], out.logps[2], atol=0, rtol=0)


def test_sft_learns_a_skewed_answer_distribution():
    cfg = lm.TinyLMConfig(vocab_size=len(gw.VOCAB), d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=6)
    rng = np.random.default_rng(0)
    answers = rng.choice([25, 26, 27], size=400, p=[0.7, 0.2, 0.1])
    ids, labels = gw.pack([[2, 3]] * len(answers), [[int(a), 1] for a in answers])
    params = lm.train_sft(cfg, ids, labels, steps=150, batch=64, lr=1e-2, seed=0)
    cand_ids, cand_labels = gw.pack([[2, 3]] * 3, [[25, 1], [26, 1], [27, 1]])
    logp, _ = lm.evaluate_sequences(params, cfg, cand_ids, cand_labels)
    seen = np.bincount(answers - 25, minlength=3) / len(answers)
    np.testing.assert_allclose(np.exp(logp[0]), seen, atol=0.04)


# ----------------------------------------------------------------------------------------------------
# Metrics


def test_oracle_frontier_starts_at_the_reference_and_rises():
    rng = np.random.default_rng(1)
    p_ref = rng.dirichlet(np.ones(gw.K + 1), size=5)
    reward = np.concatenate([rng.random((5, gw.K)), np.zeros((5, 1))], axis=1)
    kl, r = gt.oracle_frontier(p_ref, reward)
    assert kl[0] == pytest.approx(0.0, abs=1e-12)
    assert r[0] == pytest.approx(float((p_ref * reward).sum(1).mean()), abs=1e-12)
    assert np.all(np.diff(kl) >= -1e-12) and np.all(np.diff(r) >= -1e-12)
    assert r[-1] == pytest.approx(float(reward.max(1).mean()), abs=1e-3)


def test_evaluate_the_reference_itself(world):
    prompts = np.flatnonzero(world.heldout)
    rng = np.random.default_rng(2)
    ref_logp = np.log(rng.dirichlet(np.ones(gw.K), size=len(prompts)) * 0.97)  # 3% off the candidates
    pairs = gw.preference_pairs(world, prompts, 6, np.ones((len(world.prompt), gw.K)), rng)
    m = gt.evaluate(world, prompts, np.stack([ref_logp, ref_logp - 0.1]), ref_logp, pairs)["all"]
    assert m["kl"][0] == pytest.approx(0.0, abs=1e-12) and m["regret"][0] == pytest.approx(0.0, abs=1e-9)
    assert m["win_rate"][0] == pytest.approx(0.5, abs=1e-12)  # against itself, ties count ½
    assert m["accuracy"][0] == 0.5  # no margin anywhere: every pair is a tie
    # moving mass off the candidate set lowers reward and win rate, and costs KL
    assert m["reward"][1] < m["reward"][0] and m["win_rate"][1] < 0.5 and m["kl"][1] > 0


def test_pair_dispersion_is_the_library_estimator(world):
    rng = np.random.default_rng(4)
    ent = rng.random((len(world.prompt), gw.K)) * 3
    pairs = gw.preference_pairs(world, np.arange(len(world.prompt)), 3, np.ones((len(world.prompt), gw.K)), rng)
    c, phi_star = gt.pair_dispersion(world, pairs, ent)
    assert c.mean() == pytest.approx(1.0, rel=1e-9)  # φ* auto: mean c = 1 over the pairs
    j = 7
    x, w, lose = pairs["x"][j], pairs["w"][j], pairs["l"][j]
    e = 0.5 * (ent[x, w] + ent[x, lose]) / math.log(len(gw.VOCAB))
    assert c[j] == pytest.approx(-phi_star * math.log(e), rel=1e-12)
    assert mpf.DEFAULT_PHI_STAR != phi_star


# ----------------------------------------------------------------------------------------------------
# The script, reduced configuration


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generated_task")
    return out, gt.main(["--quick", "--out", str(out)])


def test_quick_run_writes_its_files(quick_run):
    out, result = quick_run
    for name in ("results.md", "summary.json", "per_seed.csv", "frontier.csv", "seeds.csv", "frontier.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "summary.json") as fh:
        assert json.load(fh)["config"]["quick"] is True
    cfg = gt.CONFIGS["quick"]
    assert len(result["tests"]) == len(gt.LEVELS) * len(gt.TESTED) * (len(gt.METHODS) - 1)
    assert all(0 <= t["p_signflip_holm"] <= 1 for t in result["tests"])
    with open(out / "per_seed.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == cfg["seeds"] * len(gt.LEVELS) * len(gt.METHODS) * len(cfg["betas"])
    for row in rows:
        assert 0.0 <= float(row["reward"]) <= 1.0 and float(row["kl"]) >= 0.0
        assert 0.0 <= float(row["win_rate"]) <= 1.0 and 0.0 <= float(row["accuracy"]) <= 1.0
        assert float(row["regret"]) > -1e-3  # nothing beats the frontier (up to its interpolation)


def test_quick_run_is_deterministic(quick_run, tmp_path):
    out, _ = quick_run
    gt.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    with open(out / "per_seed.csv") as a, open(tmp_path / "per_seed.csv") as b:
        first = [r for r in csv.DictReader(a) if r["seed"] == "1"]
        assert first == list(csv.DictReader(b))
