"""The tiny tokenizer: deterministic, small, Llama-3 special tokens as single ids, digits split,
lossless round trip, and loadable by transformers.AutoTokenizer."""
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from agro_megatron.data import SPECIAL_TOKENS, build_tiny_tokenizer, generate_problems, load_tokenizer
from agro_megatron.data.tokenizer import train_tiny_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), seed=0)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_deterministic_across_processes(tok_dir, tmp_path):
    # Rust hash maps are seeded per process, so compare against a build in a fresh interpreter.
    code = f"from agro_megatron.data import build_tiny_tokenizer; build_tiny_tokenizer({str(tmp_path)!r}, seed=0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()


def test_autotokenizer_loads_with_llama3_special_tokens(tok):
    assert len(tok) <= 512
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.chat_template
    ids = set()
    for special in SPECIAL_TOKENS:
        encoded = tok(special, add_special_tokens=False)["input_ids"]
        assert len(encoded) == 1, special
        assert tok.convert_ids_to_tokens(encoded[0]) == special
        ids.add(encoded[0])
    assert len(ids) == len(SPECIAL_TOKENS)
    # like Llama-3, encoding with special tokens prepends BOS once
    assert tok("What is 2 + 3?")["input_ids"][0] == tok.bos_token_id
    assert tok("What is 2 + 3?")["input_ids"][1:] == tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]


def test_every_digit_is_its_own_token(tok):
    for text in ("1234567890", "x = 305, so 12/30", "$\\frac{16}{15}$ and -907"):
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())


def test_synthetic_solutions_are_short(tok):
    problems = generate_problems(1000, seed=9)
    lengths = [len(tok(p.solution, add_special_tokens=False)["input_ids"]) for p in problems]
    level1 = [n for n, p in zip(lengths, problems) if p.level == 1]
    assert max(level1) <= 20 and max(lengths) <= 45


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_text(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_round_trip_math_text(tok):
    for text in ("Löse $\\int_0^1 x^2\\,dx$ ≈ 0.333…\n\n\tdone", "  two  spaces\r\n", "<|eot_id|>inline"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_vocab_size_floor():
    with pytest.raises(ValueError, match="at least"):
        train_tiny_tokenizer(["abc"], vocab_size=100)
