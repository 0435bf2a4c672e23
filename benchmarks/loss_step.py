"""A whole preference-loss step on given logits: sequence log-probs -> preference loss -> backward.

The logits [2B, T, V] hold B chosen rows then B rejected rows, with the prompt (first quarter) and a
random padding tail masked, as a DPO batch looks. Reference log-probs are fixed tensors (as with
precomputed reference log-probs). For MallowsPO (``--loss mallows_theta``) the dispersion comes from
the per-sequence entropies of the same logits, detached, standing in for the reference model's
entropies: same cost, and it is why the op computes the entropy at all.

Providers: those of :data:`benchmarks.providers.PROVIDERS`; ``compiled`` compiles the per-token reference
only, ``compiled-loss`` compiles the whole step loss (sequence sums of the eager reference, dispersion,
preference loss) into one graph, forward and backward: the strongest baseline a user would write.

Byte formula: forward + backward over the unmasked rows, 3·N_unmasked·V·element_size (masked rows are
never read by our kernels; implementations that read them move more).

Usage::

    python -m benchmarks.loss_step --device cpu --batch 4 --seq 512 --vocab 32000 --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import mallowspo_fast as mpf
from mallowspo_fast.ops.naive import naive_sequence_logprobs

from .harness import DTYPES, Case, Result, default_device, log, run_case
from .providers import IGNORE_INDEX, LOGP_ONLY, LOSS_LEVEL, PROVIDERS, Unavailable, availability, sequence_fn
from .report import write_report

LOSSES = ("sigmoid", "mallows_theta")


def make_batch(batch: int, seq: int, vocab: int, dtype: str, device: str, seed: int = 0):
    """Logits [2B, T, V] (requires grad), labels [2B, T] with masked prompt and padding, ref logps [B] x2."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = 2 * batch
    logits = 2.0 * torch.randn(rows, seq, vocab, generator=gen)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, : seq // 4] = IGNORE_INDEX
    pad = torch.randint(0, max(1, seq // 4), (rows,), generator=gen)
    positions = torch.arange(seq).expand(rows, seq)
    labels[positions >= (seq - pad).unsqueeze(1)] = IGNORE_INDEX
    ref = -50.0 + 5.0 * torch.randn(2, batch, generator=gen)
    logits = logits.to(device=device, dtype=DTYPES[dtype]).requires_grad_(True)
    return logits, labels.to(device), ref[0].to(device), ref[1].to(device)


def preference_loss_of(logps, entropy, num_tokens, vocab: int, ref_chosen, ref_rejected, loss_type: str):
    """The batch's preference loss from its sequence log-probs (chosen rows first), entropies and counts."""
    chosen, rejected = logps.chunk(2)
    c = None
    if loss_type.startswith("mallows"):
        ent_w, ent_l = entropy.detach().chunk(2)
        n_w, n_l = num_tokens.chunk(2)
        c = mpf.neg_log_dispersion(ent_w, ent_l, vocab, chosen_num_tokens=n_w, rejected_num_tokens=n_l)
    return mpf.preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type, beta=0.1,
                               neg_log_dispersion=c).loss


def whole_step_loss(logits, labels, ref_chosen, ref_rejected, loss_type: str):
    """The whole loss as a user writes it, for ``compiled-loss``: the eager reference's sequence sums, then
    the preference loss (one graph under torch.compile, forward and backward)."""
    logps, entropy, num_tokens = naive_sequence_logprobs(logits, labels, IGNORE_INDEX)
    return preference_loss_of(logps, entropy, num_tokens, logits.shape[-1], ref_chosen, ref_rejected, loss_type)


def build_case(spec: dict[str, Any]) -> Case:
    device, loss_type, provider = spec["device"], spec["loss"], spec["provider"]
    if loss_type not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss_type!r}")
    if loss_type.startswith("mallows") and provider in LOGP_ONLY:
        raise Unavailable("unsupported", "MallowsPO needs the entropy, which this provider does not compute")
    logits, labels, ref_chosen, ref_rejected = make_batch(spec["batch"], spec["seq"], spec["vocab"],
                                                          spec["dtype"], device, spec.get("seed", 0))
    vocab = logits.shape[-1]

    def setup():
        logits.grad = None

    if provider in LOSS_LEVEL:
        missing = availability(provider, device)
        if missing is not None:
            raise Unavailable(*missing)
        compiled = torch.compile(whole_step_loss, dynamic=False)

        def step(_):
            compiled(logits, labels, ref_chosen, ref_rejected, loss_type).backward()
    else:
        fn = sequence_fn(provider, device)

        def step(_):
            preference_loss_of(*fn(logits, labels), vocab, ref_chosen, ref_rejected, loss_type).backward()

    unmasked = int((labels != IGNORE_INDEX).sum())
    elem = logits.element_size()
    return Case(step, setup, setup, bytes_moved=3 * unmasked * vocab * elem, tokens=unmasked,
                input_bytes=logits.numel() * elem)


def sweep(device: str, batch: int, seq: int, vocabs: list[int], dtypes: list[str], losses: list[str],
          providers: list[str], warmup: int, repeats: int, memory: bool = True, log=log,
          threads: int | None = None) -> list[Result]:
    results = []
    for loss in losses:
        for dtype in dtypes:
            for vocab in vocabs:
                for provider in providers:
                    spec = {"subject": "loss_step", "device": device, "provider": provider, "loss": loss,
                            "batch": batch, "seq": seq, "vocab": vocab, "dtype": dtype, "warmup": warmup,
                            "repeats": repeats, "memory": memory, "threads": threads}
                    label = f"loss_step {loss:13s} B={batch} T={seq} V={vocab:<7d} {dtype} {provider:9s}"
                    results.append(run_case(spec, availability(provider, device), label, log))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark one preference-loss step on given logits")
    p.add_argument("--device", default=default_device())
    args0 = p.parse_known_args(argv)[0]
    cuda = args0.device.startswith("cuda")
    p.add_argument("--batch", type=int, default=4, help="pairs B (the logits hold 2B rows)")
    p.add_argument("--seq", type=int, default=1024 if cuda else 512)
    p.add_argument("--vocab", type=int, nargs="+", default=[128256] if cuda else [32000])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16"] if cuda else ["fp32"])
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--warmup", type=int, default=10 if cuda else 2)
    p.add_argument("--repeats", type=int, default=30 if cuda else 10)
    p.add_argument("--out", default="bench_results")
    args = p.parse_args(argv)
    results = sweep(args.device, args.batch, args.seq, args.vocab, args.dtype, args.loss, args.providers,
                    args.warmup, args.repeats)
    print(write_report({"loss_step": results}, args.device, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
