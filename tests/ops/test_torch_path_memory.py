"""Memory of the torch path (docs/kernels.md §Byte budget): beyond the gradient, only O(N) + one chunk (eager
chunks) or O(N) (compiled route), checked for both routes.

Measured as the peak resident set of an isolated process, the only honest CPU measure: the baseline
is taken after the logits exist (the kernel's high-water mark is reset there), the peak after forward
+ backward.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import mallowspo_fast as mpf

    def status_bytes(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    n, vocab, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    logits = torch.randn(8, n // 8, vocab).requires_grad_(True)
    labels = torch.randint(0, vocab, (8, n // 8))
    # Warm up allocator and libraries on a tiny problem so their one-off memory is in the baseline.
    w = torch.randn(2, 3, vocab, requires_grad=True)
    s = mpf.sequence_logprobs(w, labels[:2, :3], backend=backend)
    (s.logps.sum() + s.entropy.sum()).backward()
    del w, s
    # Reset the kernel's resident-set high-water mark (VmHWM) so that the peak belongs to this run alone.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_bytes("VmRSS")
    assert status_bytes("VmHWM") <= base + 16 * 2**20, "the high-water mark was not reset"
    seq = mpf.sequence_logprobs(logits, labels, backend=backend)
    (seq.logps.sum() + 0.1 * seq.entropy.sum()).backward()
    peak = status_bytes("VmHWM")
    print(peak - base, logits.numel() * logits.element_size())
    """
)


def measure_extra_peak(n: int, vocab: int, backend: str, compile_mode: str = "auto") -> tuple[int, int]:
    env = dict(os.environ, MALLOWSPO_FAST_TORCH_COMPILE=compile_mode)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(vocab), backend],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra, logits_bytes = (int(x) for x in proc.stdout.split())
    return extra, logits_bytes


@pytest.mark.parametrize("compile_mode", ["1", "0"], ids=["compiled", "eager-chunks"])
@pytest.mark.parametrize("n,vocab", [(4096, 32000)])
def test_extra_peak_is_at_most_1_1x_logits(n, vocab, compile_mode):
    extra, logits_bytes = measure_extra_peak(n, vocab, "torch", compile_mode)
    # The gradient itself is 1.0x; everything else (chunk temporaries, O(N) stats) within 0.1x.
    assert extra <= 1.1 * logits_bytes, f"extra peak {extra / 2**20:.0f} MiB for {logits_bytes / 2**20:.0f} MiB logits"
    assert extra >= 0.9 * logits_bytes, "the measurement must at least see the gradient buffer"
