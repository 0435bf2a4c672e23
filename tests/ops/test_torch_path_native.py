"""The native route of the torch path (CPU C loops, ``ops/cpu_native.py``) against the float64 reference.

Both builds are tested: the one the route uses (AVX-512 where the compiler targets it) and the portable
loops (``-DMALLOWSPO_PORTABLE``) that every other CPU gets. The route is forced on small shapes
(``MALLOWSPO_FAST_TORCH_COMPILE=1``). Vocabulary sizes cover a partial last vector (V mod 16 != 0), fewer
than 16 entries, and more than one block of 128.
"""

from __future__ import annotations

import math

import pytest
import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops import cpu_native, pages
from mallowspo_fast.ops import torch_path as tp
from mallowspo_fast.ops.transform import LogitTransform
from mallowspo_fast.testing import GRAD_ATOL, VALUE_ATOL, ref_token

pytestmark = pytest.mark.skipif(cpu_native._compiler() is None, reason="the native route needs a C compiler")


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setenv(tp.COMPILE_ENV, "1")
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "1")
    assert cpu_native.library() is not None, cpu_native._State.failed
    return cpu_native


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The portable build (no AVX-512 intrinsics), loaded beside the default one."""
    lib = cpu_native.load(cpu_native.build(("-DMALLOWSPO_PORTABLE",), tmp_path_factory.mktemp("portable")))
    assert lib.cpu_rows_simd_width() == 1
    return lib


def _inputs(dtype, batch=3, seq=9, vocab=300, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, ::4] = -100
    g, h = torch.randn(batch, seq, generator=gen), torch.randn(batch, seq, generator=gen)
    return logits, labels, g, h


def _check(out, grad, src, labels, g, h, temperature=1.0):
    xr, ref_lp, ref_h = ref_token(src, labels, -100, temperature)
    dtype = src.dtype
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=VALUE_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=VALUE_ATOL[dtype], rtol=1e-5)
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), xr.grad, atol=GRAD_ATOL[dtype], rtol=1e-2)


def _run(x, labels, g, h, temperature=1.0, inplace=False):
    out = mpf.token_logprobs(x, labels, temperature=temperature, backend="torch", inplace_backward=inplace)
    (out.logps * g + out.entropy * h).sum().backward()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [5, 16, 300, 1037])
def test_values_and_grads_match_float64(native, dtype, vocab, monkeypatch):
    logits, labels, g, h = _inputs(dtype, vocab=vocab, seed=vocab)
    if vocab > 16:
        logits[..., vocab - 7:] = float("-inf")  # padded vocabulary
        labels[labels >= vocab - 7] = 3
    logits[0, 1] = float("-inf")  # a masked row of nothing but -inf
    labels[0, 1] = -100
    x = logits.clone().requires_grad_(True)
    calls = []
    for name in ("forward_rows", "backward_rows"):
        real = getattr(cpu_native, name)
        monkeypatch.setattr(cpu_native, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    monkeypatch.setattr(tp, "_call_compiled", lambda *a, **k: pytest.fail("the Inductor loops ran"))
    out = _run(x, labels, g, h)
    assert calls == ["forward_rows", "backward_rows"]
    assert (x.grad[0, 1] == 0).all()
    if vocab > 16:
        assert (x.grad[..., vocab - 7:] == 0).all()
    src = logits.clone()
    src[0, 1] = 0.0  # the float64 reference gives nan on an all -inf row, even masked; ours gives 0
    _check(out, x.grad, src, labels, g, h)


def test_temperature_strided_view_inplace_and_no_labels(native):
    logits, labels, g, h = _inputs(torch.float32, vocab=301)
    x = logits.clone().requires_grad_(True)
    view, lab = x[:, :-1], labels[:, 1:]  # rows of a batch element are not mergeable with the next one
    out = _run(view, lab, g[:, 1:], h[:, 1:], temperature=0.7)
    assert (x.grad[:, -1] == 0).all()
    _check(out, x.grad[:, :-1], logits[:, :-1], lab, g[:, 1:], h[:, 1:], temperature=0.7)

    leaf = logits.clone().requires_grad_(True)
    out = _run(leaf * 1.0, labels, g, h, inplace=True)
    _check(out, leaf.grad, logits, labels, g, h)

    no_labels = mpf.token_entropy(logits, backend="torch")
    _, _, ref_h = ref_token(logits, torch.zeros(logits.shape[:2], dtype=torch.long))
    torch.testing.assert_close(no_labels.entropy.double(), ref_h, atol=VALUE_ATOL[torch.float32], rtol=1e-5)
    torch.testing.assert_close(no_labels.lse.double(), torch.logsumexp(logits.double(), -1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.5, -0.75])
def test_logit_scales_of_either_sign(native, scale):
    """A positive scale takes the max of the raw logits, a negative one of the scaled logits."""
    logits, labels, g, h = _inputs(torch.float32, vocab=333)
    x = logits.clone().requires_grad_(True)
    out = mpf.token_logprobs(x, labels, logit_scale=scale, backend="torch")
    (out.logps * g + out.entropy * h).sum().backward()
    transform = LogitTransform.checked(1.0, None, scale, "test")
    xr, ref_lp, ref_h = ref_token(logits, labels, -100, transform=transform)
    torch.testing.assert_close(out.logps.double(), ref_lp, atol=VALUE_ATOL[torch.float32], rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_h, atol=VALUE_ATOL[torch.float32], rtol=1e-5)
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=GRAD_ATOL[torch.float32], rtol=1e-2)


def test_large_logits_keep_their_precision(native):
    """|z| ~ 1e4: one fp32 ulp of lse is 1e-3; the log-prob stays exact through lse's residual."""
    logits, labels, g, h = _inputs(torch.float32, vocab=1000)
    logits = logits + 1e4
    x = logits.clone().requires_grad_(True)
    _check(_run(x, labels, g, h), x.grad, logits, labels, g, h)


def test_nonfinite_logits(native):
    logits = torch.zeros(1, 4, 40)
    logits[0, 0, 3] = float("nan")
    logits[0, 1, 5] = float("inf")
    logits[0, 2, :39] = float("-inf")  # one finite logit
    labels = torch.tensor([[1, 1, 39, 2]])
    out = mpf.token_logprobs(logits, labels, backend="torch")
    assert math.isnan(out.logps[0, 0]) and math.isnan(out.entropy[0, 0])
    assert not math.isfinite(out.logps[0, 1])
    assert out.logps[0, 2] == 0.0 and out.entropy[0, 2] == 0.0
    assert torch.isclose(out.logps[0, 3], torch.tensor(-math.log(40.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_portable_build_matches_the_reference(native, portable, dtype):
    """The portable loops (any CPU without AVX-512) against float64, through the same launcher."""
    logits, labels, g, h = _inputs(dtype, batch=1, seq=40, vocab=1037)
    z, lab = logits[0], labels[0]
    mask = lab != -100
    logp, ent, lse, lse_lo = cpu_native.forward_rows(z, lab, mask, 1.0, lib=portable)
    xr, ref_lp, ref_h = ref_token(logits, labels, -100)
    torch.testing.assert_close(logp.double(), ref_lp[0], atol=VALUE_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_h[0], atol=VALUE_ATOL[dtype], rtol=1e-5)
    grad = torch.empty_like(z)
    cpu_native.backward_rows(z, grad, lab, mask, lse, ent, g[0], h[0], torch.zeros(40), lse_lo, 1.0, lib=portable)
    (ref_lp * g.double() + ref_h * h.double()).sum().backward()
    torch.testing.assert_close(grad.double(), xr.grad[0], atol=GRAD_ATOL[dtype], rtol=1e-2)
    # and the default build agrees with it to a few ulps
    logp2, ent2, *_ = cpu_native.forward_rows(z, lab, mask, 1.0)
    torch.testing.assert_close(logp2, logp, atol=4e-6, rtol=4e-6)
    torch.testing.assert_close(ent2, ent, atol=4e-6, rtol=4e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_row_is_bitwise_the_same_alone_and_in_any_batch(native, dtype):
    logits, labels, g, h = _inputs(dtype, batch=4, seq=33, vocab=517)
    full = mpf.token_logprobs(logits, labels, backend="torch")
    for b, t in ((0, 1), (2, 17), (3, 32)):
        one = mpf.token_logprobs(logits[b:b + 1, t:t + 1].clone(), labels[b:b + 1, t:t + 1], backend="torch")
        assert torch.equal(one.logps[0, 0], full.logps[b, t]) and torch.equal(one.entropy[0, 0], full.entropy[b, t])
    grads = []
    for rows in (slice(None), slice(1, 2)):
        x = logits[rows].clone().requires_grad_(True)
        _run(x, labels[rows], g[rows], h[rows])
        grads.append(x.grad)
    assert torch.equal(grads[0][1:2], grads[1])


def test_exp_sum_counts_every_exponential(native):
    x = torch.linspace(-80.0, 0.5, 1000)
    got = native.library().cpu_rows_exp_sum(x.data_ptr(), x.numel(), 3, 2)
    assert got == pytest.approx(6 * torch.exp(x.double()).sum().item(), rel=1e-6)


def test_route_selection_and_build_failure(monkeypatch, tmp_path):
    x = torch.empty(2, 3, 64)
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "1")
    assert cpu_native.serves(x, False, False) and cpu_native.serves(x.bfloat16(), False, False)
    assert not cpu_native.serves(x.half(), False, False) and not cpu_native.serves(x.double(), False, False)
    assert not cpu_native.serves(x, True, False), "the soft cap stays on the Inductor loops"
    assert not cpu_native.serves(x, False, True), "the extra statistics stay on the Inductor loops"
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    assert not cpu_native.serves(x, False, False)
    # a compiler that fails: one warning, then the Inductor loops serve
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "1")
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(cpu_native, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(cpu_native._State, "lib", None)
    monkeypatch.setattr(cpu_native._State, "failed", None)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
        assert not cpu_native.serves(x, False, False)
    assert "compiling the native CPU kernels failed" in cpu_native._State.failed


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(cpu_native.tempfile, "tempdir", str(tmp_path / "tmp"))
    got = cpu_native._writable(blocked / "native")
    assert got.parent == tmp_path / "tmp" and got.name.startswith("mallowspo_fast-") and got.is_dir()
    lib = cpu_native.load(cpu_native.build(directory=got))
    assert lib.cpu_rows_simd_width() in (1, 16)


def test_fresh_gradients_ask_for_huge_pages(monkeypatch):
    big = torch.empty(16 * 2**20 // 4)
    asked = pages.advise_huge(big) if pages.enabled() else 0
    if pages.thp_mode() in ("always", "madvise") and pages._madvise() is not None:
        assert asked >= 8 * 2**20, "a 16 MiB buffer holds at least 7 whole 2 MiB pages"
    else:
        assert asked == 0
    assert pages.advise_huge(torch.empty(1000)) == 0, "small buffers are left alone"
    monkeypatch.setenv(pages.HUGE_PAGES_ENV, "0")
    assert pages.advise_huge(big) == 0 and not pages.enabled()
    out = pages.empty_like_huge(torch.ones(3, 5, dtype=torch.bfloat16))
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16
