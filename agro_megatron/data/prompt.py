"""The prompt the policy sees: Llama-3 chat format with the paper's "The final answer is X" ask.

docs/algorithm.md §9: the system prompt asks for a step-by-step solution ending in
"The final answer is X", which is what the reward parses. A tokenizer that ships a
``chat_template`` renders the messages itself (so a real Llama-3 checkpoint gets exactly its own
format); otherwise :data:`LLAMA3_CHAT_TEMPLATE` / :func:`render_llama3` (identical output) are used.
"""
from __future__ import annotations

from typing import Any, Sequence

from .problem import Problem

FINAL_ANSWER_MARKER = "The final answer is"

SYSTEM_PROMPT = (
    "Solve the math problem step by step. Keep the steps short, then end your response with "
    '"The final answer is X", where X is the final answer in simplest form.'
)

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"

# Jinja for tokenizer_config.json; renders byte-for-byte what render_llama3 returns.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


def build_messages(problem: Problem | str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """System + user messages for one problem (no system message when system_prompt is None)."""
    text = problem.problem if isinstance(problem, Problem) else str(problem)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": text})
    return messages


def render_llama3(messages: Sequence[dict], *, add_generation_prompt: bool = True, bos: str = BOS) -> str:
    """The Llama-3 chat format: BOS, then per message a role header, content (trimmed), EOT."""
    parts = [bos]
    for message in messages:
        parts.append(f"{START_HEADER}{message['role']}{END_HEADER}\n\n{message['content'].strip()}{EOT}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    problem: Problem | str, tokenizer: Any = None, *, system_prompt: str | None = SYSTEM_PROMPT
) -> str:
    """The prompt string, ending with the assistant header the model continues from."""
    messages = build_messages(problem, system_prompt)
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None) or BOS
    return render_llama3(messages, bos=bos)


def encode_prompt(
    problem: Problem | str, tokenizer: Any, *, system_prompt: str | None = SYSTEM_PROMPT
) -> list[int]:
    """Token ids of :func:`format_prompt`. The text already holds BOS, so the tokenizer adds none
    (as HF's ``apply_chat_template(tokenize=True)`` does)."""
    text = format_prompt(problem, tokenizer, system_prompt=system_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int:
    """Id that ends an assistant turn: ``<|eot_id|>`` when the vocabulary has it, else EOS."""
    vocab = tokenizer.get_vocab()
    if EOT in vocab:
        return vocab[EOT]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|eot_id|> nor an eos_token; set eos_token in tokenizer_config.json")
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids on which generation stops: end of turn, EOS and ``<|end_of_text|>`` when present."""
    vocab = tokenizer.get_vocab()
    ids = [end_of_turn_id(tokenizer)]
    for candidate in (tokenizer.eos_token_id, vocab.get(EOS)):
        if candidate is not None and candidate not in ids:
            ids.append(candidate)
    return ids


def sft_response(problem: Problem) -> str:
    """Supervised target: the worked solution, ending with the final-answer sentence.

    MATH solutions end in ``\\boxed{...}`` rather than the marker, so the sentence is appended
    when the solution lacks it; with no solution the target is the sentence alone.
    """
    solution = (problem.solution or "").strip()
    if FINAL_ANSWER_MARKER.lower() in solution.lower():
        return solution
    closing = f"{FINAL_ANSWER_MARKER} {problem.answer}"
    return f"{solution}\n{closing}" if solution else closing


def encode_sft_example(
    problem: Problem, tokenizer: Any, *, system_prompt: str | None = SYSTEM_PROMPT
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids); the response ends with the end-of-turn id, so the loss
    teaches the model to stop."""
    prompt = encode_prompt(problem, tokenizer, system_prompt=system_prompt)
    response = list(tokenizer(sft_response(problem), add_special_tokens=False)["input_ids"])
    return prompt, response + [end_of_turn_id(tokenizer)]
