"""The Mallows–Kendall model of experiments/mallows.py against brute-force enumeration and the library."""

import math

import numpy as np
import pytest
import torch

import mallowspo_fast as mpf
from experiments import mallows


@pytest.mark.parametrize("phi", [0.05, 0.4, 0.9, 1.0])
@pytest.mark.parametrize("n", [3, 5])
def test_sequence_entropy_equals_the_entropy_of_the_enumerated_distribution(n, phi):
    _, probs = mallows.exact_distribution(n, phi)
    assert mallows.sequence_entropy(n, phi) == pytest.approx(-(probs * np.log(probs)).sum(), abs=1e-12)


def test_normalised_entropy_range_and_maxima():
    phis = np.array([0.01, 0.3, 0.7, 1.0])
    seq = mallows.normalised_entropy(6, phis, "sequence")
    assert np.all(np.diff(seq) > 0) and seq[-1] == pytest.approx(1.0)
    assert mallows.normalised_entropy(6, 1.0, "top_choice") == pytest.approx(1.0)
    # Per choice, every step is normalised by log n although step m has only m options.
    expected = math.lgamma(7) / (6 * math.log(6))
    assert mallows.normalised_entropy(6, 1.0, "per_choice") == pytest.approx(expected)


def test_sampler_matches_the_exact_distribution():
    n, phi, size = 4, 0.5, 60_000
    perms, probs = mallows.exact_distribution(n, phi)
    drawn = mallows.sample_rankings(n, phi, size, np.random.default_rng(0))
    index = {tuple(p): i for i, p in enumerate(perms.tolist())}
    freq = np.bincount([index[tuple(r)] for r in drawn.tolist()], minlength=len(perms)) / size
    # Total variation of an exact sampler with 60k draws over 24 outcomes is ~0.01; a wrong law is >> that.
    assert 0.5 * np.abs(freq - probs).sum() < 0.02


def test_sampler_takes_one_dispersion_per_draw():
    phi = np.array([1e-9] * 500 + [1.0] * 500)
    drawn = mallows.sample_rankings(5, phi, 1000, np.random.default_rng(1))
    assert np.all(drawn[:500] == np.arange(5))  # φ → 0: the central ranking
    assert len({tuple(r) for r in drawn[500:].tolist()}) > 60  # φ = 1: uniform over 120 rankings


def test_choice_indices_sum_to_the_kendall_distance():
    drawn = mallows.sample_rankings(7, 0.6, 200, np.random.default_rng(2))
    j = mallows.choice_indices(drawn)
    assert np.array_equal(j.sum(-1), mallows.kendall_distance(drawn))
    assert np.all(j <= np.arange(6, -1, -1))


def test_plugin_entropy_approaches_the_truth():
    drawn = mallows.sample_rankings(5, 0.5, 50_000, np.random.default_rng(3))
    assert mallows.plugin_sequence_entropy(drawn) == pytest.approx(mallows.sequence_entropy(5, 0.5), abs=0.01)


@pytest.mark.parametrize("phi", [0.2, 0.5, 0.8])
def test_pair_marginal_closed_form_equals_enumeration_and_the_library_phi_link(phi):
    perms, probs = mallows.exact_distribution(6, phi)
    place = np.argsort(perms, axis=1)
    for first, d in [(0, 1), (2, 1), (1, 3), (0, 5)]:
        exact = probs[place[:, first] < place[:, first + d]].sum()
        assert mallows.pair_prob(d, phi) == pytest.approx(exact, abs=1e-13)
        lib = mpf.mallows_phi_link(torch.tensor(float(d), dtype=torch.float64), phi)
        assert float(lib) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mallows.sequence_entropy(4, 1.5), "φ in"),
        (lambda: mallows.sequence_entropy(0, 0.5), "positive integer"),
        (lambda: mallows.normalised_entropy(4, 0.5, "bogus"), "one of"),
        (lambda: mallows.exact_distribution(9, 0.5), "n <= 8"),
        (lambda: mallows.pair_prob(1.5, 0.5), "integers"),
        (lambda: mallows.pair_prob(2, 1.0), "φ < 1"),
    ],
    ids=["phi-above-one", "zero-items", "unknown-normalisation", "too-many-to-enumerate", "fractional-gap",
         "uniform-pair"],
)
def test_bad_input_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
