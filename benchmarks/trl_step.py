"""One optimizer step of TRL's ``DPOTrainer`` with and without the fused op (``mallowspo_fast.integrations.trl``).

A randomly initialised Llama (``transformers.LlamaConfig``, no download) with a large vocabulary is trained
by the real ``trl.DPOTrainer`` (provider ``trl``: TRL 1.16's own chunked LM head) or by ``MallowsDPOTrainer``
(provider ``ours``: the fused op as the LM head; loss ``sigmoid`` as TRL, or ``mallows_theta``; ``ours-packed``:
the same with ``padding_free=True``, the padded rows packed into one before the backbone). The timed call is
``trainer.training_step`` (policy forward, live reference forward, loss, backward) plus the AdamW step, on one
fixed batch of B pairs: random prompts of ``--prompt`` tokens and completions of ``--completion`` tokens (the
prompt is masked, as in DPO); with ``--ragged`` each row's prompt and completions are drawn between a quarter of
those lengths and the full lengths, so the padded batch carries padding (tokens/s counts real tokens). Memory is
the extra peak of the step above the state before it (models, optimizer states and batch already exist). Every
case runs in its own process.

Usage::

    python -m benchmarks.trl_step --vocab 128256 --batch 2 --prompt 192 --completion 64
    python -m benchmarks.trl_step --vocab 128256 --batch 4 --prompt 192 --completion 64 --ragged --loss sigmoid
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
from typing import Any

import torch

from .harness import RESULT_MARKER, Case, Result, default_device, log, run_in_process, run_isolated
from .report import write_report

PROVIDERS = ("trl", "ours", "ours-packed")
LOSSES = ("sigmoid", "mallows_theta")
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)
# Text rows only to construct the trainer (TRL tokenises its dataset at construction); the timed batch is
# made of random token ids over the model's vocabulary.
_TEXT_ROWS = [{"prompt": f"Question {i}:", "chosen": f" good answer {i}", "rejected": f" bad answer {i}"}
              for i in range(4)]


def trl_available() -> bool:
    """Whether TRL (the ``[trl]`` extra) is importable; the suite lists the subject as skipped otherwise."""
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def _trainer(spec: dict[str, Any]):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from mallowspo_fast.data.tokenizer import train_tokenizer
    from mallowspo_fast.integrations.trl import MallowsDPOConfig, MallowsDPOTrainer

    seq = spec["prompt"] + spec["completion"]
    config = LlamaConfig(vocab_size=spec["vocab"], max_position_embeddings=seq, tie_word_embeddings=False, **MODEL)
    torch.manual_seed(spec.get("seed", 0))
    model = LlamaForCausalLM(config)
    ref = copy.deepcopy(model)
    ours = spec["provider"].startswith("ours")
    extra = {"padding_free": True} if spec["provider"] == "ours-packed" else {}
    args = (MallowsDPOConfig if ours else DPOConfig)(**extra,
        output_dir=tempfile.mkdtemp(prefix="trl_step_"), per_device_train_batch_size=spec["batch"],
        learning_rate=1e-5, report_to="none", use_cpu=spec["device"] == "cpu", bf16=False, fp16=False,
        loss_type=[spec["loss"]], beta=0.1, max_length=None, disable_tqdm=True, save_strategy="no")
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in _TEXT_ROWS], vocab_size=300,
                          min_frequency=1)
    cls = MallowsDPOTrainer if ours else DPOTrainer
    return cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(_TEXT_ROWS),
               processing_class=tok)


def build_case(spec: dict[str, Any]) -> Case:
    if spec["provider"] not in PROVIDERS:
        raise ValueError(f"trl_step: provider must be one of {PROVIDERS}, found {spec['provider']!r}")
    if spec["loss"] not in LOSSES or (spec["loss"] != "sigmoid" and not spec["provider"].startswith("ours")):
        raise ValueError(f"trl_step: loss {spec['loss']!r} with provider {spec['provider']!r}: TRL itself only runs "
                         f"'sigmoid' here; 'mallows_theta' needs provider 'ours'")
    trainer = _trainer(spec)
    trainer.model.to(spec["device"]).train()
    trainer.ref_model.to(spec["device"])
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    vocab, b = spec["vocab"], spec["batch"]

    def ids(n):
        if spec.get("ragged"):  # between a quarter of n and n tokens
            n = int(torch.randint(max(1, n // 4), n + 1, (), generator=gen))
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    rows = [{"prompt_ids": ids(spec["prompt"]), "chosen_ids": ids(spec["completion"]),
             "rejected_ids": ids(spec["completion"])} for _ in range(b)]
    real_tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-5)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not used here

    def step(_):
        trainer.training_step(trainer.model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for values in trainer._metrics["train"].values():
            values.clear()

    seq = spec["prompt"] + spec["completion"]
    params = sum(p.numel() for p in trainer.model.parameters())
    padded = int(batch["input_ids"].numel())
    return Case(step, None, tokens=real_tokens, input_bytes=2 * b * seq * vocab * 4,
                notes=f"{params / 1e6:.1f}M params; prompt {spec['prompt']} + completion {spec['completion']}; "
                      f"{real_tokens} real tokens in {padded} padded positions")


def _run_isolated(spec: dict[str, Any], timeout_s: float = 1800.0) -> Result:
    """One case in a fresh interpreter (``python -m benchmarks.trl_step --case '<json>'``)."""
    return run_isolated(spec, timeout_s, command=[sys.executable, "-m", "benchmarks.trl_step", "--case",
                                                  json.dumps(spec)])


def _case_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = run_in_process(build_case(spec), spec)
    data = dataclasses.asdict(result)
    del data["spec"]
    print(RESULT_MARKER + json.dumps(data), flush=True)
    return 0


def sweep(device: str, vocab: int, batch: int, prompt: int, completion: int, losses: list[str], warmup: int,
          repeats: int, threads: int | None = None, log=log, ragged: bool = False,
          providers: tuple[str, ...] = PROVIDERS) -> list[Result]:
    results = []
    for loss in losses:
        for provider in providers:
            if provider == "trl" and loss != "sigmoid":
                continue
            if provider == "ours-packed" and not ragged:
                continue  # without padding there is nothing to pack
            spec = {"subject": "trl_step", "device": device, "provider": provider, "model": "llama-256x2",
                    "loss": loss, "batch": batch, "seq": prompt + completion, "prompt": prompt,
                    "completion": completion, "vocab": vocab, "dtype": "fp32", "warmup": warmup, "repeats": repeats,
                    "memory": True, "threads": threads, "ragged": ragged}
            r = _run_isolated(spec)
            log(f"  trl_step {loss:13s} {provider:11s} {r.status:8s} "
                + (f"{r.median_ms:10.1f} ms" if r.median_ms is not None else r.notes))
            results.append(r)
    return results


def comparison_markdown(results: list[Result]) -> str:
    """Ours against TRL's own head on the same step (sigmoid): time and extra peak memory ratios."""
    by = {(r.spec["provider"], r.spec["loss"]): r for r in results if r.status == "ok"}
    trl, lines = by.get(("trl", "sigmoid")), []
    if trl is None:
        return "TRL's own step did not run."
    for (provider, loss), r in sorted(by.items()):
        if provider == "trl":
            continue
        mem = "-" if not (r.extra_peak_bytes and trl.extra_peak_bytes) else \
            f"{r.extra_peak_bytes / trl.extra_peak_bytes:.2f}×"
        tps = "" if not (r.tokens_per_s and trl.tokens_per_s) else \
            f", tokens/s {r.tokens_per_s / trl.tokens_per_s:.2f}×"
        lines.append(f"- {provider} ({loss}) vs TRL (sigmoid): time {r.median_ms / trl.median_ms:.2f}×, "
                     f"extra peak memory {mem}{tps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark one TRL DPOTrainer step with and without the fused op")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--device", default=default_device())
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=2, help="pairs B (the model sees 2B rows)")
    p.add_argument("--prompt", type=int, default=192)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ragged", action="store_true", help="rows of different lengths (padding), and the packed provider")
    p.add_argument("--out", default="bench_results/trl_step")
    args = p.parse_args(argv)
    if args.case:
        return _case_main(args.case)
    results = sweep(args.device, args.vocab, args.batch, args.prompt, args.completion, args.loss, args.warmup,
                    args.repeats, args.threads, ragged=args.ragged)
    print(write_report({"trl_step": results}, args.device, args.out,
                       extra_markdown={"ours vs TRL": comparison_markdown(results)}, plots=False,
                       threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
