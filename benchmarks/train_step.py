"""One training step of a small causal LM with a DPO / MallowsPO loss: fused op vs the reference path.

A randomly initialised Llama (``transformers.LlamaConfig``; no download) runs forward on a batch of B
chosen + B rejected sequences, the sequence log-probs come from the provider under test, the
preference loss is taken against fixed (precomputed) reference log-probs, then backward and an AdamW
step. Reports tokens/s (all 2·B·T tokens the model sees) and the extra peak memory of the step above
the state before it (model, optimizer states and batch already exist).

Usage::

    python -m benchmarks.train_step --device cpu --batch 2 --seq 256 --vocab 32000
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import mallowspo_fast as mpf

from .harness import DTYPES, Case, Result, default_device, log, run_case
from .providers import IGNORE_INDEX, availability, sequence_fn
from .report import write_report

MODELS = {
    # name: (hidden, intermediate, layers, heads)
    "llama-tiny": (256, 688, 2, 4),
    "llama-small": (768, 2048, 6, 12),
}
PROVIDERS = ("ours", "reference", "compiled")
LOSSES = ("sigmoid", "mallows_theta")


def make_model(name: str, vocab: int, seq: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads = MODELS[name]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def build_case(spec: dict[str, Any]) -> Case:
    device, loss_type = spec["device"], spec["loss"]
    batch, seq, vocab = spec["batch"], spec["seq"], spec["vocab"]
    if spec["provider"] not in PROVIDERS:
        raise ValueError(f"train_step provider must be one of {PROVIDERS}, got {spec['provider']!r}")
    fn = sequence_fn(spec["provider"], device)
    model = make_model(spec["model"], vocab, seq, DTYPES[spec["dtype"]], device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(spec.get("seed", 0))
    input_ids = torch.randint(0, vocab, (2 * batch, seq), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, : seq // 4] = IGNORE_INDEX  # the prompt
    ref_chosen, ref_rejected = (-50.0 + 5.0 * torch.randn(2, batch, generator=gen)).to(device)

    def step(_):
        logits = model(input_ids=input_ids).logits
        logps, entropy, num_tokens = fn(logits[:, :-1], labels[:, 1:])
        chosen, rejected = logps.chunk(2)
        c = None
        if loss_type == "mallows_theta":
            ent_w, ent_l = entropy.detach().chunk(2)
            n_w, n_l = num_tokens.chunk(2)
            c = mpf.neg_log_dispersion(ent_w, ent_l, vocab, chosen_num_tokens=n_w, rejected_num_tokens=n_l)
        out = mpf.preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type, beta=0.1,
                                  neg_log_dispersion=c)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    logits_bytes = 2 * batch * seq * vocab * torch.tensor([], dtype=DTYPES[spec["dtype"]]).element_size()
    return Case(step, None, bytes_moved=None, tokens=2 * batch * seq, input_bytes=logits_bytes,
                notes=f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")


def sweep(device: str, model: str, batch: int, seq: int, vocab: int, dtype: str, losses: list[str],
          providers: list[str], warmup: int, repeats: int, memory: bool = True, log=log,
          threads: int | None = None) -> list[Result]:
    results = []
    for loss in losses:
        for provider in providers:
            spec = {"subject": "train_step", "device": device, "provider": provider, "model": model,
                    "loss": loss, "batch": batch, "seq": seq, "vocab": vocab, "dtype": dtype,
                    "warmup": warmup, "repeats": repeats, "memory": memory, "threads": threads}
            label = f"train_step {model} {loss:13s} {provider:9s}"
            results.append(run_case(spec, availability(provider, device), label, log))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark one DPO / MallowsPO training step of a small model")
    p.add_argument("--device", default=default_device())
    cuda = p.parse_known_args(argv)[0].device.startswith("cuda")
    p.add_argument("--model", choices=list(MODELS), default="llama-small" if cuda else "llama-tiny")
    p.add_argument("--batch", type=int, default=8 if cuda else 2, help="pairs B (the model sees 2B rows)")
    p.add_argument("--seq", type=int, default=1024 if cuda else 256)
    p.add_argument("--vocab", type=int, default=128256 if cuda else 32000)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=["ours", "reference"])
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--repeats", type=int, default=20 if cuda else 5)
    p.add_argument("--out", default="bench_results")
    args = p.parse_args(argv)
    results = sweep(args.device, args.model, args.batch, args.seq, args.vocab, args.dtype, args.loss,
                    args.providers, args.warmup, args.repeats)
    print(write_report({"train_step": results}, args.device, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
