"""Fuzzed inputs of the losses: preference_loss (every loss type and option), neg_log_dispersion, kto_loss
and orpo_loss.

Valid inputs must give finite per-example losses equal to a float64 re-derivation of the documented
formulas (mallows_phi: finite and equal to the float64 run of the same call); invalid ones must raise
ValueError/TypeError naming the argument.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fuzz_helpers import CLEAR_ERRORS, fuzz_pair
from hypothesis import strategies as st

from mallowspo_fast.losses import LOSS_TYPES, kto_loss, neg_log_dispersion, orpo_loss, preference_loss

ATOL = {torch.float32: 2e-4, torch.float64: 1e-9}


def _vec(draw, b, low, high, dtype, seed_offset=0):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)) + seed_offset)
    return (low + (high - low) * torch.rand(b, generator=g, dtype=torch.float64)).to(dtype)


@st.composite
def preference_case(draw):
    b, dtype = draw(st.integers(1, 6)), draw(st.sampled_from([torch.float32, torch.float64]))
    types = draw(st.lists(st.sampled_from(LOSS_TYPES), min_size=1, max_size=3, unique=True))
    robust = "robust" in types
    kw = {
        "loss_type": types[0] if len(types) == 1 and draw(st.booleans()) else types,
        "beta": draw(st.floats(1e-3, 10)),
        "label_smoothing": draw(st.floats(0, 0.49 if robust else 1.0)),
        "neg_log_dispersion": _vec(draw, b, 0.01, 5, dtype) if draw(st.booleans()) else draw(st.floats(0.01, 5)),
        "chosen_num_tokens": torch.randint(0, 30, (b,)),
        "rejected_num_tokens": torch.randint(0, 30, (b,)),
        "length_normalization": draw(st.booleans()),
        "reference_free": draw(st.booleans()),
        "home_advantage": draw(st.floats(-2, 2)),
        "mixing_alpha": draw(st.none() | st.floats(0, 1)),
        "simpo_gamma": draw(st.floats(-2, 2)),
        "loss_weights": None if isinstance(types, str) or draw(st.booleans()) else
        [draw(st.floats(-3, 3)) for _ in types],
        "add_sft_loss": draw(st.booleans()),
        "sft_coef": draw(st.floats(0, 2)),
        "rpo_alpha": draw(st.none() | st.floats(0, 2)),
    }
    if isinstance(kw["loss_type"], str):
        kw["loss_weights"] = None
    logps = [_vec(draw, b, -60, 0, dtype, i) for i in range(4)]
    return logps, kw


def _reference_losses(logps, kw):
    """float64 re-derivation of the documented per-pair formulas (None for mallows_phi)."""
    pw, pl, rw, rl = (x.double() for x in logps)
    types = [kw["loss_type"]] if isinstance(kw["loss_type"], str) else kw["loss_type"]
    if "mallows_phi" in types:
        return None
    beta, eps, gamma, alpha = kw["beta"], kw["label_smoothing"], kw["home_advantage"], kw["mixing_alpha"]
    c = kw["neg_log_dispersion"]
    c = c.double() if isinstance(c, torch.Tensor) else torch.full_like(pw, c)
    nw, nl = kw["chosen_num_tokens"].clamp(min=1).double(), kw["rejected_num_tokens"].clamp(min=1).double()
    uses_ref = not kw["reference_free"] and any(t != "simpo" for t in types)

    def margin(norm):
        a, b_, ra, rb = (pw / nw, pl / nl, rw / nw, rl / nl) if norm else (pw, pl, rw, rl)
        r = (ra - rb) if uses_ref else torch.zeros_like(a)
        return (a - b_) - r - gamma if alpha is None else (a - b_) - alpha * r - (1 - alpha) * gamma

    def smooth(z):
        return (1 - eps) * F.softplus(-z) + eps * F.softplus(z)

    weights = kw["loss_weights"] or [1.0] * len(types)
    total = torch.zeros_like(pw)
    for t, w in zip(types, weights):
        ln = kw["length_normalization"] or t in ("ipo", "simpo")
        m = margin(ln)
        if t == "sigmoid":
            per = smooth(beta * m)
        elif t == "ipo":
            per = (m - 1 / (2 * beta)) ** 2
        elif t == "hinge":
            per = torch.relu(1 - beta * m)
        elif t == "robust":
            per = ((1 - eps) * F.softplus(-beta * m) - eps * F.softplus(beta * m)) / (1 - 2 * eps)
        elif t == "simpo":
            per = smooth(beta * (pw / nw - pl / nl) - kw["simpo_gamma"])
        elif t == "mallows_theta":
            per = smooth(beta * c * m)
        elif t == "cauchy":  # official -log(atan(z)/pi + 1/2): accurate in float64 at the fuzzed |z| (< 1e4)
            per = -torch.log(torch.atan(beta * m) / math.pi + 0.5)
        else:
            assert t == "mallows_ipo", t
            per = (c * m - 1 / (2 * beta)) ** 2
        total = total + w * per
    nll = -pw / nw
    if kw["add_sft_loss"]:
        total = total + kw["sft_coef"] * nll
    if kw["rpo_alpha"] is not None:
        total = kw["rpo_alpha"] * total + nll
    return total


def check_preference(case):
    logps, kw = case
    pw = logps[0].clone().requires_grad_(True)
    out = preference_loss(pw, *logps[1:], **kw)
    assert out.losses.shape == pw.shape and torch.isfinite(out.losses).all()
    torch.testing.assert_close(out.loss, out.losses.mean())
    out.loss.backward()
    assert torch.isfinite(pw.grad).all()
    want = _reference_losses(logps, kw)
    if want is None:  # mallows_phi: the same call in float64
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
        want = preference_loss(*(x.double() for x in logps), **kw64).losses
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(out.losses.double(), want, atol=ATOL[logps[0].dtype] * scale, rtol=1e-4)


test_preference_valid, test_preference_valid_slow = fuzz_pair(case=preference_case(), scale=3)(check_preference)


def check_dispersion(b, phi_star, vocab, with_counts, seed):
    g = torch.Generator().manual_seed(seed)
    log_v = math.log(vocab)
    hw, hl = torch.rand(b, generator=g, dtype=torch.float64) * log_v, torch.rand(b, generator=g, dtype=torch.float64)
    nw, nl = torch.randint(0, 3, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)
    counts = {"chosen_num_tokens": nw, "rejected_num_tokens": nl} if with_counts else {}
    c = neg_log_dispersion(hw, hl, vocab, phi_star=phi_star, **counts)
    e = (0.5 * (hw + hl) / log_v).clamp(1e-6, 1.0)
    want = -phi_star * torch.log(e)
    if with_counts:
        want = torch.where((nw == 0) | (nl == 0), torch.ones_like(want), want)
    assert bool((c >= 0).all()) and bool(torch.isfinite(c).all())
    torch.testing.assert_close(c, want, atol=1e-12, rtol=1e-9)


test_dispersion_valid, test_dispersion_valid_slow = fuzz_pair(
    b=st.integers(0, 6), phi_star=st.floats(1e-3, 10), vocab=st.integers(2, 200_000), with_counts=st.booleans(),
    seed=st.integers(0, 2**31 - 1), scale=3,
)(check_dispersion)


def check_kto_orpo(b, beta, weights, kl, seed):
    g = torch.Generator().manual_seed(seed)
    pol, ref = -60 * torch.rand(b, generator=g, dtype=torch.float64), -60 * torch.rand(b, generator=g,
                                                                                      dtype=torch.float64)
    labels = torch.rand(b, generator=g) < 0.5
    out = kto_loss(pol, ref, labels, kl=kl, beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    z0, r = max(kl, 0.0), pol - ref
    want = torch.where(labels, weights[0] * torch.sigmoid(-beta * (r - z0)),
                       weights[1] * torch.sigmoid(-beta * (z0 - r)))
    torch.testing.assert_close(out.losses, want, atol=1e-12, rtol=1e-9)
    nw, nl = torch.randint(0, 20, (b,), generator=g), torch.randint(0, 20, (b,), generator=g)
    orpo = orpo_loss(pol, ref, nw, nl, beta=beta)
    assert bool(torch.isfinite(orpo.losses).all()) and bool((orpo.losses >= orpo.nll_loss - 1e-12).all())


test_kto_orpo_valid, test_kto_orpo_valid_slow = fuzz_pair(
    b=st.integers(1, 6), beta=st.floats(1e-3, 10), weights=st.tuples(st.floats(0, 5), st.floats(0, 5)),
    kl=st.floats(-5, 5), seed=st.integers(0, 2**31 - 1), scale=3,
)(check_kto_orpo)


# ------------------------------------------------------------------------------------------------------
# invalid arguments: one argument of a valid call replaced by a value it never accepts
B = 3
_f = torch.zeros(B) - 1.0
BAD_TENSORS = [[-1.0] * B, -1.0, None, torch.zeros(B, dtype=torch.long), torch.zeros(B, 2), torch.zeros(B + 1),
               torch.zeros(B, dtype=torch.bool), "x"]
BAD_POSITIVE = [0, 0.0, -1.0, math.nan, math.inf, True, "0.1", None]
CALLS = {
    "preference_loss": (preference_loss, ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                          "ref_rejected_logps"], {"loss_type": "mallows_theta"}),
    "kto_loss": (kto_loss, ["policy_logps", "ref_logps", "labels"], {"kl": 0.1}),
    "orpo_loss": (orpo_loss, ["policy_chosen_logps", "policy_rejected_logps", "chosen_num_tokens",
                              "rejected_num_tokens"], {}),
    "neg_log_dispersion": (neg_log_dispersion, ["chosen_entropy", "rejected_entropy", "vocab_size"], {}),
}
SCALARS = {
    "preference_loss": {"beta": BAD_POSITIVE, "label_smoothing": [-0.1, 1.5, math.nan, "0"], "mixing_alpha":
                        [-0.5, 2.0, math.inf], "loss_type": ["dpo", "", [], ["sigmoid", "sigmoid"], 3],
                        "neg_log_dispersion": [None, torch.zeros(B + 2), "c", torch.zeros(B, dtype=torch.long)],
                        "loss_weights": [[1.0, 2.0], [math.nan], 1.0], "home_advantage": [math.nan, math.inf, "1"],
                        "rpo_alpha": [math.nan, "a"], "sft_coef": [math.inf]},
    "kto_loss": {"beta": BAD_POSITIVE, "desirable_weight": [-1.0, math.nan, math.inf], "undesirable_weight":
                 [-0.1, "1"], "kl": [math.nan, torch.zeros(2), "k"]},
    "orpo_loss": {"beta": BAD_POSITIVE, "chosen_nll": [torch.zeros(B + 1), "n", torch.zeros(B, dtype=torch.long)]},
    "neg_log_dispersion": {"phi_star": BAD_POSITIVE[:-1] + ["auto"], "chosen_num_tokens": [torch.zeros(B + 1)]},
}


def _valid_positional(name: str) -> list:
    if name == "kto_loss":
        return [_f.clone(), _f.clone(), torch.tensor([True, False, True])]
    if name == "orpo_loss":
        return [_f.clone(), _f.clone(), torch.ones(B, dtype=torch.long), torch.ones(B, dtype=torch.long)]
    if name == "neg_log_dispersion":
        return [torch.ones(B), torch.ones(B), 100]
    return [_f.clone() for _ in range(4)]


@st.composite
def invalid_call(draw):
    name = draw(st.sampled_from(sorted(CALLS)))
    fn, positional, kwargs = CALLS[name]
    args, kwargs = _valid_positional(name), dict(kwargs)
    if name == "preference_loss":
        kwargs["neg_log_dispersion"] = torch.ones(B)
    if draw(st.booleans()):
        i = draw(st.integers(0, len(positional) - 1))
        arg = positional[i]
        pool = BAD_TENSORS if arg != "vocab_size" else [1, 0, -5, 2.5, True, "100", None]
        if arg == "labels":
            pool = [torch.ones(B), torch.ones(B, dtype=torch.long), [True] * B, torch.ones(B + 1, dtype=torch.bool)]
        if arg.endswith("num_tokens"):
            pool = [v for v in BAD_TENSORS if not (isinstance(v, torch.Tensor) and v.dtype == torch.long)]
            pool += [torch.ones(B, dtype=torch.bool)]
        args[i] = draw(st.sampled_from(pool))
    else:
        arg = draw(st.sampled_from(sorted(SCALARS[name])))
        kwargs[arg] = draw(st.sampled_from(SCALARS[name][arg]))
        if arg == "chosen_num_tokens":
            kwargs["rejected_num_tokens"] = torch.ones(B, dtype=torch.long)
        if arg == "loss_weights":
            kwargs["loss_type"] = ["sigmoid", "mallows_theta"] if kwargs[arg] == [math.nan] else "sigmoid"
            kwargs[arg] = [math.nan, 1.0] if kwargs[arg] == [math.nan] else kwargs[arg]
    return name, fn, args, kwargs, arg


def check_invalid(call):
    name, fn, args, kwargs, arg = call
    try:
        fn(*args, **kwargs)
    except CLEAR_ERRORS as err:
        words = {arg, arg.replace("num_tokens", "tokens"), "loss_weights[" if arg == "loss_weights" else arg}
        assert any(w in str(err) for w in words), (name, arg, str(err))
        return
    raise AssertionError(f"{name}: {arg} accepted: {args} {kwargs}")


test_invalid_arguments, test_invalid_arguments_slow = fuzz_pair(call=invalid_call(), scale=3)(check_invalid)
