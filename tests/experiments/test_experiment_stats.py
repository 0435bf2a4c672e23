"""The statistics of experiments/common.py against closed forms and brute force."""

import itertools
import math

import numpy as np
import pytest

from experiments import common


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 12.0])
def test_t_tail_df1_is_the_cauchy_closed_form(t):
    assert common.t_sf_two_sided(t, 1) == pytest.approx(1.0 - 2.0 / math.pi * math.atan(t), abs=1e-13)


def test_t_tail_df2_closed_form():
    # Student t with 2 degrees of freedom: P(|T| >= t) = 1 − t / sqrt(2 + t²).
    for t in (0.5, 1.7, 4.0):
        assert common.t_sf_two_sided(t, 2) == pytest.approx(1.0 - t / math.sqrt(2 + t * t), abs=1e-13)


@pytest.mark.parametrize("df", [1, 4, 11, 60])
@pytest.mark.parametrize("q", [0.6, 0.9, 0.975, 0.995])
def test_t_ppf_inverts_the_tail(df, q):
    t = common.t_ppf(q, df)
    assert t > 0
    assert common.t_sf_two_sided(t, df) == pytest.approx(2 * (1 - q), rel=1e-9)
    assert common.t_ppf(1 - q, df) == pytest.approx(-t, abs=1e-10)


def test_t_ppf_textbook_value():
    assert common.t_ppf(0.975, 10) == pytest.approx(2.2281388519649, abs=1e-9)


def test_mean_ci_matches_the_formula_and_a_single_value_is_zero_width():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    ci = common.mean_ci(x)
    half = common.t_ppf(0.975, 3) * x.std(ddof=1) / 2.0
    assert (ci.mean, ci.lo, ci.hi) == pytest.approx((3.5, 3.5 - half, 3.5 + half), abs=1e-12)
    one = common.mean_ci([0.25])
    assert one.lo == one.mean == one.hi == 0.25


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    x = np.random.default_rng(1).normal(2.0, 1.0, size=40)
    a, b = common.bootstrap_ci(x, seed=3), common.bootstrap_ci(x, seed=3)
    assert a == b
    assert a.lo < x.mean() < a.hi
    assert a.mean == pytest.approx(x.mean())


def test_paired_t_test_matches_a_hand_computation():
    a, b = np.array([3.1, 2.0, 4.4, 5.0, 1.2]), np.array([2.5, 2.1, 3.9, 4.1, 1.0])
    d = a - b
    t_ref = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    t, p = common.paired_t_test(a, b)
    assert t == pytest.approx(t_ref, rel=1e-12)
    assert p == pytest.approx(common.t_sf_two_sided(t_ref, 4), rel=1e-12)


def test_sign_flip_test_equals_brute_force_enumeration():
    d = np.array([0.4, -0.1, 0.3, 0.25, -0.05, 0.6, 0.2])
    count = sum(abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12
                for s in itertools.product([-1, 1], repeat=d.size))
    assert common.sign_flip_test(d) == pytest.approx(count / 2 ** d.size, abs=0)


def test_sign_flip_test_all_positive_gives_the_smallest_p():
    assert common.sign_flip_test([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)


def test_sign_flip_monte_carlo_beyond_twenty():
    d = np.random.default_rng(0).normal(0.0, 1.0, size=25)
    p = common.sign_flip_test(d, n_mc=20_000)
    assert 0.0 < p <= 1.0
    assert common.sign_flip_test(np.abs(d) + 1.0, n_mc=20_000) < 1e-3


def test_holm_adjusted_values():
    assert common.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_rankdata_averages_ties():
    assert common.rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_is_one_under_a_monotone_map_and_minus_one_reversed():
    x = np.random.default_rng(2).normal(size=30)
    assert common.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert common.spearman(x, -x ** 3) == pytest.approx(-1.0)


def test_spearman_known_value_with_ties():
    # Ranks x: [1, 2.5, 2.5, 4], y: [1, 3, 2, 4] → Pearson of ranks.
    x_r, y_r = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4.0])
    expected = np.corrcoef(x_r, y_r)[0, 1]
    assert common.spearman([1, 5, 5, 9], [0.1, 0.7, 0.3, 2.0]) == pytest.approx(expected, abs=1e-14)


def test_fit_through_origin_recovers_a_slope():
    x = np.linspace(0.1, 3, 20)
    k, r2 = common.fit_through_origin(x, 0.7 * x)
    assert k == pytest.approx(0.7) and r2 == pytest.approx(1.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: common.mean_ci([1.0, float("nan")]), "finite"),
        (lambda: common.mean_ci([1.0, 2.0], level=1.5), "confidence level"),
        (lambda: common.paired_t_test([1.0, 2.0], [1.0, 2.0, 3.0]), "equal lengths"),
        (lambda: common.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), "constant"),
        (lambda: common.t_ppf(1.0, 3), "probability"),
        (lambda: common.mean_ci(np.ones((2, 2))), "1-d"),
    ],
    ids=["nan", "bad-level", "unequal-pairs", "constant-input", "ppf-out-of-range", "2d-input"],
)
def test_bad_input_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
