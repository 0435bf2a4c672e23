"""A local byte-level BPE tokenizer (no downloads): trained with `tokenizers`, wrapped for `transformers`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

# ChatML: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n". Used for tokenizers without a
# chat template too, so conversational rows always render the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# Keys whose string values are markup (speaker names), not text to learn merges from.
_NON_TEXT_KEYS = frozenset({"role", "from", "name", "type"})


def iter_texts(rows: Iterable[Any]) -> Iterator[str]:
    """Every string inside rows of any layout (message contents, prompts, completions), in order.

    Args:
        rows: an iterable of rows (dicts, lists of messages or strings), e.g. a dataset.

    Returns:
        An iterator over the strings; roles and speaker names are left out.
    """
    stack: list[Any] = []
    for row in rows:
        stack.append(row)
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if item:
                    yield item
            elif isinstance(item, Mapping):
                stack.extend(v for k, v in reversed(list(item.items())) if k not in _NON_TEXT_KEYS)
            elif isinstance(item, (list, tuple)):
                stack.extend(reversed(item))


def _text_source(texts_or_dataset: Any) -> Iterable[str]:
    if isinstance(texts_or_dataset, (str, os.PathLike)):
        path = Path(texts_or_dataset)
        if not path.exists():
            raise ValueError(
                f"train_tokenizer expects texts, a dataset or a data file path; "
                f"{str(texts_or_dataset)[:80]!r} is not an existing path"
            )
        from .loading import load_raw_dataset

        return iter_texts(load_raw_dataset(path, split="train"))
    if isinstance(texts_or_dataset, (datasets.Dataset, datasets.IterableDataset)):
        return iter_texts(texts_or_dataset)
    if isinstance(texts_or_dataset, Iterable):
        return iter_texts(texts_or_dataset)
    raise TypeError(
        f"train_tokenizer expects an iterable of strings, a dataset or a path, "
        f"found {type(texts_or_dataset).__name__}"
    )


def train_tokenizer(
    texts_or_dataset: Any,
    vocab_size: int = 8000,
    *,
    save_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    model_max_length: int = 4096,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a `transformers` fast tokenizer.

    Args:
        texts_or_dataset: strings, rows of any supported layout (every string inside is used), a
            `datasets` dataset, or the path of a data file.
        vocab_size: total vocabulary size including the 256 byte symbols and the special tokens.
        save_dir: if given, ``save_pretrained`` there; ``AutoTokenizer.from_pretrained(save_dir)``
            reloads it offline.
        min_frequency: minimum pair count for a merge.
        model_max_length: the tokenizer's ``model_max_length``.
        chat_template: the Jinja chat template stored with it (default: ChatML).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token = bos_token = "<|endoftext|>"``, ``pad_token =
        "<|pad|>"``, the ChatML tokens ``<|im_start|>``/``<|im_end|>`` and a ChatML chat template. It
        adds no special tokens by itself (the chat template and the tokenisation rules place them).

    Raises:
        ValueError: ``vocab_size`` below 256 bytes + the special tokens, a string that is not an
            existing path, or no text to train on.
        TypeError: an input that is neither texts, rows, a dataset nor a path.

    Examples:
        >>> tok = train_tokenizer(load_preference_data("pairs.jsonl"), vocab_size=8000, save_dir="tok")
        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS]
    minimum = 256 + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an int >= {minimum} (256 bytes + {len(specials)} special tokens), "
            f"found {vocab_size!r}"
        )
    texts = _text_source(texts_or_dataset)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for t in texts:
            count += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("train_tokenizer found no text to train on")

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = chat_template
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        wrapped.save_pretrained(str(save_dir))
    return wrapped
