"""Preference data: loading, formats, tokenisation, collation, pair generation.

Public API (a contract: code outside this repository calls these names)::

    from mallowspo_fast import data
    ds = data.load_preference_data(source, column_mapping=None, split="train", strict=False, streaming=False)
    train, eval = data.load_preference_splits(source, eval_source=None, eval_ratio=None, eval_size=None)
    tok = data.train_tokenizer(texts_or_dataset, vocab_size=8000, save_dir=None)
    ids = data.tokenize_preference_data(ds, tok, max_length=1024, max_prompt_length=None,
                                        truncation_mode="keep_start", num_proc=None)
    batch = data.PreferenceCollator(pad_token_id, pad_to_multiple_of=None)(rows)

Unpaired (KTO) data: load_unpaired_data, tokenize_unpaired_data, UnpairedCollator, and the trainer's
one-forward layout: kl_completions (the mismatched completion of each row) and KTOCollator.
"""

from .collation import (
    IGNORE_INDEX,
    KTOCollator,
    PackedPreferenceCollator,
    PreferenceCollator,
    UnpairedCollator,
    kl_completions,
    pack_sequences,
)
from .distributed import is_main_process, main_process_first
from .formats import KNOWN_ROLES, PAIRED_FORMATS, UNPAIRED_FORMATS, parse_hh, split_common_prefix
from .loading import (
    DataReport,
    Splits,
    bundled_dataset_path,
    load_preference_data,
    load_preference_splits,
    load_raw_dataset,
    load_unpaired_data,
    normalise_dataset,
    train_eval_split,
    unpair_preference_data,
)
from .pairs import (
    PreferencePair,
    pairs_from_scored,
    pairs_from_single,
    split_sentences,
    validate_pairs,
    write_pairs_jsonl,
)
from .tokenization import TRUNCATION_MODES, tokenize_preference_data, tokenize_unpaired_data
from .tokenizer import DEFAULT_CHAT_TEMPLATE, iter_texts, train_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "KNOWN_ROLES",
    "PAIRED_FORMATS",
    "TRUNCATION_MODES",
    "UNPAIRED_FORMATS",
    "DataReport",
    "KTOCollator",
    "PackedPreferenceCollator",
    "PreferenceCollator",
    "PreferencePair",
    "Splits",
    "UnpairedCollator",
    "bundled_dataset_path",
    "is_main_process",
    "iter_texts",
    "kl_completions",
    "load_preference_data",
    "load_preference_splits",
    "load_raw_dataset",
    "load_unpaired_data",
    "main_process_first",
    "normalise_dataset",
    "pack_sequences",
    "pairs_from_scored",
    "pairs_from_single",
    "parse_hh",
    "split_common_prefix",
    "split_sentences",
    "tokenize_preference_data",
    "tokenize_unpaired_data",
    "train_eval_split",
    "train_tokenizer",
    "unpair_preference_data",
    "validate_pairs",
    "write_pairs_jsonl",
]
