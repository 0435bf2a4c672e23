"""The embedded default run (``mallowspo-train --demo``, the README's ``make demo``).

A tiny Llama-style model built from a config, a byte-level BPE tokenizer trained on the bundled real
preference data (cached in the output directory), a short SFT warm-up on the chosen responses so that
the reference is a real (if tiny) language model, then MallowsPO-θ with precomputed reference log-probs
and entropies and phi_star='auto'. Sized to finish in a few minutes on two CPU cores.
"""

from __future__ import annotations

import math
from typing import Any

CHANCE_ACCURACY = 0.5  # a model that cannot rank a pair ranks it right half the time
_Z95 = 1.959963984540054  # standard normal quantile of 0.975


def demo_defaults() -> dict[str, Any]:
    """The demo's config keys; ``key=value`` on the command line overrides any of them."""
    from ..data import bundled_dataset_path

    return {
        "model_config": {
            "model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },
        "train_tokenizer": True,
        "tokenizer_vocab_size": 2048,
        "dataset_name": bundled_dataset_path(),
        "eval_ratio": 0.1,
        "max_length": 256,
        "max_prompt_length": 128,
        "sft_warmup_steps": 80,
        "sft_learning_rate": 3e-3,
        "loss_type": "mallows_theta",
        "phi_star": "auto",
        "beta": 0.1,
        "learning_rate": 5e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": 3,
        "logging_steps": 5,
        "eval_steps": 25,
        "save_steps": 0,
        "save_total_limit": 1,
        "zero_stage": 3,
        "output_dir": "outputs/demo",
        "seed": 42,
    }


def wilson_interval(proportion: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion observed over ``n`` trials."""
    if n < 1 or not 0.0 <= proportion <= 1.0:
        raise ValueError(f"wilson_interval: expected n >= 1 and a proportion in [0, 1], found n={n}, "
                         f"proportion={proportion}")
    z2n = z * z / n
    centre = (proportion + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(proportion * (1 - proportion) / n + z2n / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_verdict(accuracy: float, n: int) -> str:
    """How far an eval reward accuracy over ``n`` pairs says anything: its 95% interval against chance."""
    lo, hi = wilson_interval(accuracy, n)
    if lo > CHANCE_ACCURACY:
        verdict = "above chance"
    elif hi < CHANCE_ACCURACY:
        verdict = "below chance"
    else:
        verdict = "not distinguishable from chance"
    return (f"eval reward accuracy over {n} pairs: 95% interval [{lo:.2f}, {hi:.2f}] (Wilson), {verdict} "
            f"({CHANCE_ACCURACY})")


def format_summary(result: Any, cfg: Any) -> str:
    """The end-of-run summary printed by the CLI. The eval reward accuracy comes with the eval set's size and
    its 95% interval: a tiny held-out set (the demo's 30 pairs) cannot tell a model from chance."""
    tm, em = result.train_metrics, result.eval_metrics

    def g(d: dict, k: str) -> str:
        v = d.get(k)
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        "",
        f"== mallowspo-train: {'stopped' if result.stopped_by else 'done'} at step {result.step}/{result.total_steps} "
        f"in {result.seconds:.0f} s ({'+'.join(cfg.loss_types)}, beta={cfg.beta}) ==",
        f"  train (last logging window): loss {g(tm, 'loss')}, reward accuracy {g(tm, 'rewards/accuracies')}, "
        f"margin {g(tm, 'rewards/margins')}",
    ]
    if em:
        lines.append(f"  eval: loss {g(em, 'eval_loss')}, reward accuracy {g(em, 'eval_rewards/accuracies')}, "
                     f"margin {g(em, 'eval_rewards/margins')}")
        accuracy = em.get("eval_rewards/accuracies")
        if accuracy is not None and result.eval_examples:
            lines.append(f"  {accuracy_verdict(accuracy, result.eval_examples)}")
    if "dispersion/neg_log_mean" in tm:
        phi = "n/a" if result.phi_star is None else f"{result.phi_star:.4f}"
        lines.append(f"  dispersion: phi_star {phi}{' (auto)' if cfg.phi_star == 'auto' else ''}, c(x) mean "
                     f"{g(tm, 'dispersion/neg_log_mean')} std {g(tm, 'dispersion/neg_log_std')}, normalised "
                     f"entropy mean {g(tm, 'dispersion/entropy_mean')}")
    elif "dispersion/entropy_mean" in tm:
        lines.append(f"  reference normalised entropy mean {g(tm, 'dispersion/entropy_mean')}")
    if result.stopped_by:
        lines.append(f"  stopped by {result.stopped_by}; resume with resume_from_checkpoint=auto")
    if result.model_dir:
        lines.append(f"  model (Hugging Face format): {result.model_dir}")
    if result.checkpoint_dir:
        lines.append(f"  checkpoint: {result.checkpoint_dir}")
    if result.metrics_path:
        lines.append(f"  metrics: {result.metrics_path}")
    if result.curves_path:
        lines.append(f"  curves: {result.curves_path}")
    return "\n".join(lines)
