"""``mallowspo-data``: inspect / validate data files, generate preference pairs, train a local tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .loading import load_raw_dataset, normalise_dataset
from .pairs import (
    REJECTION_STRATEGIES,
    pairs_from_scored,
    pairs_from_single,
    validate_pairs,
    write_pairs_jsonl,
)


def _mapping(text: str | None) -> dict[str, str] | None:
    """'prompt=question,chosen=response_j' -> {'prompt': 'question', 'chosen': 'response_j'}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(
                f"expected CANONICAL=COLUMN pairs separated by commas, found {item!r}"
            )
        out[key.strip()] = value.strip()
    return out


def _preview(messages: Any, width: int = 100) -> str:
    if isinstance(messages, list):
        text = " | ".join(f"{m['role']}: {m['content']}" for m in messages)
    else:
        text = str(messages)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_inspect(args: argparse.Namespace, fail_on_skips: bool) -> int:
    raw = load_raw_dataset(args.source, split=args.split)
    try:
        ds, report = normalise_dataset(
            raw, paired=not args.unpaired, column_mapping=args.column_mapping, strict=args.strict
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"source: {args.source}")
    print(f"columns: {raw.column_names}")
    print(report.summary())
    if ds.num_rows:
        row = ds[0]
        keys = ("chosen", "rejected") if not args.unpaired else ("completion", "label")
        print("first row:")
        print(f"  prompt: {_preview(row['prompt'])}")
        for k in keys:
            print(f"  {k}: {_preview(row[k])}")
        print(f"  rendering: {'chat template' if row['is_conversational'] else 'plain text + EOS'}")
    if args.tokenizer:
        _print_token_stats(ds, args)
    return 1 if fail_on_skips and report.num_skipped else 0


def _print_token_stats(ds: Any, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .tokenization import tokenize_preference_data, tokenize_unpaired_data

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    fn = tokenize_unpaired_data if args.unpaired else tokenize_preference_data
    tok = fn(ds, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    keys = ["prompt_ids", "completion_ids"] if args.unpaired else ["prompt_ids", "chosen_ids", "rejected_ids"]
    print(f"tokenised rows: {tok.num_rows} of {ds.num_rows} (max_length={args.max_length})")
    for k in keys:
        lengths = sorted(len(x) for x in tok[k])
        print(f"  {k}: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")


def _cmd_pairs(args: argparse.Namespace) -> int:
    raw = load_raw_dataset(args.source, split=args.split)
    records = list(raw)
    try:
        if args.mode == "scored":
            pairs = pairs_from_scored(
                records,
                prompt_key=args.prompt_key,
                response_key=args.response_key,
                score_key=args.score_key,
                min_score_gap=args.min_score_gap,
                pairs_per_prompt=args.pairs_per_prompt,
            )
        else:
            pairs = pairs_from_single(
                records,
                strategy=args.strategy,
                seed=args.seed,
                prompt_key=args.prompt_key,
                response_key=args.response_key,
            )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    kept, removed = validate_pairs(pairs, min_chars=args.min_chars, max_chars=args.max_chars)
    if not kept:
        print(
            f"error: no valid pairs from {len(records)} records (removed: {dict(removed)})", file=sys.stderr
        )
        return 1
    n = write_pairs_jsonl(kept, args.output, include_scores=not args.no_scores)
    summary = {
        "records": len(records),
        "pairs": len(pairs),
        "written": n,
        "removed": dict(removed),
        "output": str(args.output),
    }
    print(json.dumps(summary))
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(
        args.source, args.vocab_size, save_dir=args.output, min_frequency=args.min_frequency
    )
    print(f"saved a {len(tok)}-token byte-level BPE tokenizer to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mallowspo-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("inspect", "print the detected format, the skipped rows and a first row"),
        ("validate", "like inspect; exit status 1 when any row is skipped"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("source", help="data file, folder, save_to_disk folder or hub name")
        p.add_argument("--split", default="train")
        p.add_argument(
            "--column-mapping",
            type=_mapping,
            default=None,
            help="CANONICAL=COLUMN,... e.g. prompt=question,chosen=response_j,rejected=response_k",
        )
        p.add_argument("--unpaired", action="store_true", help="unpaired (KTO) data")
        p.add_argument("--strict", action="store_true", help="fail on the first malformed row")
        p.add_argument("--tokenizer", help="tokenizer folder: also print token length statistics")
        p.add_argument("--max-length", type=int, default=1024)
        p.add_argument("--max-prompt-length", type=int, default=None)

    p = sub.add_parser("pairs", help="generate preference pairs and write standard-format JSONL")
    p.add_argument("source", help="records with prompt and response (and score for --mode scored)")
    p.add_argument("-o", "--output", required=True, help="output .jsonl path")
    p.add_argument("--mode", choices=("scored", "single"), default="scored")
    p.add_argument("--split", default="train")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--response-key", default="response")
    p.add_argument("--score-key", default="score")
    p.add_argument("--min-score-gap", type=float, default=0.0)
    p.add_argument("--pairs-per-prompt", type=int, default=1)
    p.add_argument("--strategy", choices=REJECTION_STRATEGIES, default="perturb", help="for --mode single")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-chars", type=int, default=1)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--no-scores", action="store_true", help="write only prompt/chosen/rejected")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the text of a data file")
    p.add_argument("source", help="data file of any supported layout")
    p.add_argument("-o", "--output", required=True, help="folder for the tokenizer files")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--min-frequency", type=int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mallowspo-data`` and ``python -m mallowspo_fast.data``.

    Subcommands: ``inspect`` (detected format, skipped rows, first row; token length statistics with
    ``--tokenizer``), ``validate`` (the same, exit status 1 if any row is malformed), ``pairs`` (make
    preference pairs from scored or single responses) and ``tokenizer`` (train a local BPE tokenizer).
    ``mallowspo-data SUBCOMMAND --help`` lists the options.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when ``validate`` finds malformed rows.

    Raises:
        SystemExit: bad arguments (status 2, from argparse).

    Examples:
        >>> main(["inspect", "pairs.jsonl"])
        0
    """
    args = build_parser().parse_args(argv)
    if args.command in ("inspect", "validate"):
        return _cmd_inspect(args, fail_on_skips=args.command == "validate")
    if args.command == "pairs":
        return _cmd_pairs(args)
    return _cmd_tokenizer(args)


if __name__ == "__main__":
    sys.exit(main())
