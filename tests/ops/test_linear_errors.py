"""Bad input to the memory-mode functions: TypeError/ValueError saying what was expected and found."""

from __future__ import annotations

import pytest
import torch

import mallowspo_fast as mpf

H, V = 8, 20


def _ok():
    return torch.randn(2, 3, H), torch.randn(V, H), torch.randint(0, V, (2, 3))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda h, w, lab: (h.long(), w, lab, {}), TypeError, "hidden must be float"),
        (lambda h, w, lab: (h, w.int(), lab, {}), TypeError, "weight must be float32/bfloat16/float16/float64"),
        (lambda h, w, lab: (h, w, lab.float(), {}), TypeError, "labels must be int64"),
        (lambda h, w, lab: (h, w, lab[:, :2], {}), ValueError, r"hidden \(2, 3, 8\) and labels \(2, 2\)"),
        (lambda h, w, lab: (h, w[:, :5], lab, {}), ValueError, r"weight \[V, H\] with H = 8.*\(20, 5\)"),
        (lambda h, w, lab: (h, w, lab, {"bias": torch.zeros(V + 1)}), ValueError, r"bias \[20\].*\(21,\)"),
        (lambda h, w, lab: (h, w, lab, {"temperature": 0.0}), ValueError, "temperature must be a positive"),
        (lambda h, w, lab: (h, w, lab, {"softcap": -1.0}), ValueError, "softcap must be None or a positive"),
        (lambda h, w, lab: (h, w, lab, {"logit_scale": 0.0}), ValueError, "logit_scale must be a finite non-zero"),
        (lambda h, w, lab: (h, w, lab, {"chunk_size": 0}), ValueError, "chunk_size must be a positive int"),
        (lambda h, w, lab: (h, w, lab, {"backend": "cuda"}), ValueError, "backend must be one of"),
        (lambda h, w, lab: (h, w, lab.masked_fill(lab == lab[1, 2], V), {}), ValueError,
         r"labels must lie in \[0, 20\).*found 20"),
    ],
    ids=["int-hidden", "int-weight", "float-labels", "label-shape", "weight-dim", "bias-shape",
         "temperature", "softcap", "logit-scale", "chunk-size", "backend", "label-out-of-range"],
)
def test_bad_input(change, error, match):
    hidden, weight, labels, kw = change(*_ok())
    with pytest.raises(error, match=match):
        mpf.linear_sequence_logprobs(hidden, weight, labels, **kw)


def test_sequence_needs_3d_hidden():
    hidden, weight, labels = _ok()
    with pytest.raises(ValueError, match=r"expected hidden \[B, T, H\], got shape \(6, 8\)"):
        mpf.linear_sequence_logprobs(hidden.reshape(6, H), weight, labels.reshape(6))
