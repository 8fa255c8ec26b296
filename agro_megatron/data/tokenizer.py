"""A small BPE tokenizer with Llama-3's special tokens, for tiny models on CPU.

Trained with the ``tokenizers`` library on synthetic problems and the prompt text, then saved as
``tokenizer.json`` + ``tokenizer_config.json`` (with the Llama-3 chat template), so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads it like a real checkpoint's tokenizer.
Design choices that matter for a tiny model:
  - every digit is its own token (multi-digit tokens make arithmetic much harder to learn);
  - byte-level BPE, so any text round-trips (no unknown tokens on real MATH problems);
  - the Llama-3 control tokens are single ids, so prompts look like Llama-3 prompts.
Llama-3's real tokenizer files are not used anywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .prompt import BOS, END_HEADER, EOS, EOT, LLAMA3_CHAT_TEMPLATE, START_HEADER, SYSTEM_PROMPT
from .synthetic import generate_problems

PAD = "<|finetune_right_pad_id|>"  # Llama-3.1's padding token
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD)

# Llama-3-style pre-tokenisation, except that numbers split into single digits and a space
# before a digit stays its own piece.
_PRETOKENIZE = (
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tiny_tokenizer_corpus(*, seed: int = 0, num_problems: int = 4000) -> list[str]:
    """Training text: the prompt boilerplate plus synthetic problems and worked solutions."""
    texts = [f"{role}\n\n" for role in ("system", "user", "assistant")] + [SYSTEM_PROMPT]
    for p in generate_problems(num_problems, seed=seed, unique=False):
        texts.append(p.problem)
        texts.append(p.solution or "")
    return texts


def train_tiny_tokenizer(texts: Iterable[str], *, vocab_size: int = 512):
    """A ``tokenizers.Tokenizer`` trained on ``texts`` (byte-level BPE, single-digit numbers)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is below the {len(alphabet)} byte symbols plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {len(alphabet) + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama-3: encoding with special tokens prepends <|begin_of_text|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def tokenizer_config(model_max_length: int = 4096) -> dict:
    """tokenizer_config.json for the tiny tokenizer (EOS is <|eot_id|>, as in Llama-3-Instruct)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    num_problems: int = 4000,
    extra_texts: Iterable[str] = (),
) -> Path:
    """Train and save the tiny tokenizer into ``out_dir``; same arguments give identical files."""
    texts = tiny_tokenizer_corpus(seed=seed, num_problems=num_problems) + list(extra_texts)
    tok = train_tiny_tokenizer(texts, vocab_size=vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` for a tokenizer folder (ours or a real checkpoint's)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "loading a tokenizer folder needs transformers: pip install 'agro-megatron[hf]'"
        ) from err
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: not a folder with tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(path))
