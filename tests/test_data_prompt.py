"""The prompt: exact Llama-3 chat format, the same text from our Jinja template via transformers,
a tokenizer's own template when it has one, and token ids with a single BOS."""
import pytest

from agro_megatron.data import (
    LLAMA3_CHAT_TEMPLATE,
    SYSTEM_PROMPT,
    Problem,
    build_messages,
    build_tiny_tokenizer,
    encode_prompt,
    encode_sft_example,
    format_prompt,
    load_tokenizer,
    render_llama3,
    sft_response,
    stop_token_ids,
)

pytest.importorskip("transformers")

PROBLEM = Problem(id="p1", problem="  What is $3 + 5$?\n", answer="8", solution="3 + 5 = 8.")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), seed=0))


def test_exact_llama3_format():
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + SYSTEM_PROMPT
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is $3 + 5$?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert format_prompt(PROBLEM) == expected
    assert "The final answer is X" in SYSTEM_PROMPT and "step by step" in SYSTEM_PROMPT
    no_system = format_prompt("Hi", system_prompt=None)
    assert no_system == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_jinja_template_matches_python_renderer(tok):
    conversations = [
        build_messages(PROBLEM),
        build_messages("x", system_prompt=None),
        build_messages(PROBLEM) + [{"role": "assistant", "content": " 8 \n"}, {"role": "user", "content": "Why?"}],
    ]
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    for messages in conversations:
        for gen in (True, False):
            got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert got == render_llama3(messages, add_generation_prompt=gen)


def test_tokenizer_template_is_preferred(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert format_prompt(PROBLEM, tok) == f"[system]{SYSTEM_PROMPT}[user]{PROBLEM.problem}"
    monkeypatch.setattr(tok, "chat_template", None)  # no template: ours, with the tokenizer's BOS
    assert format_prompt(PROBLEM, tok) == format_prompt(PROBLEM)


def test_encode_prompt_ids(tok):
    ids = encode_prompt(PROBLEM, tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    header = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert [ids.count(i) for i in header] == [3, 3, 2]
    assert tok.decode(ids) == format_prompt(PROBLEM, tok)
    assert ids == tok.apply_chat_template(build_messages(PROBLEM), tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_sft_example_and_stop_tokens(tok):
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    prompt, response = encode_sft_example(PROBLEM, tok)
    assert prompt == encode_prompt(PROBLEM, tok)
    assert response[-1] == eot and tok.decode(response[:-1]) == "3 + 5 = 8.\nThe final answer is 8"
    done = Problem(id="s", problem="q", answer="8", solution="3 + 5 = 8. The final answer is 8")
    assert sft_response(done) == done.solution
    assert sft_response(Problem(id="n", problem="q", answer="\\frac{1}{2}")) == "The final answer is \\frac{1}{2}"
    assert stop_token_ids(tok) == [eot, tok.convert_tokens_to_ids("<|end_of_text|>")]
