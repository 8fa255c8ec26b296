"""Problems in, prompts out: loaders (MATH, GSM8K), the prompt template, synthetic problems and
the tiny tokenizer for CPU runs. Heavy optional packages (datasets, transformers) load lazily."""
from .loaders import load_problems, save_jsonl
from .problem import MalformedRowError, MalformedRowWarning, Problem, last_boxed, split_gsm8k_answer
from .prompt import (
    FINAL_ANSWER_MARKER,
    LLAMA3_CHAT_TEMPLATE,
    SYSTEM_PROMPT,
    build_messages,
    encode_prompt,
    encode_sft_example,
    format_prompt,
    render_llama3,
    sft_response,
    stop_token_ids,
)
from .synthetic import generate_problems, split_problems
from .tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer

__all__ = [
    "FINAL_ANSWER_MARKER", "LLAMA3_CHAT_TEMPLATE", "MalformedRowError", "MalformedRowWarning",
    "Problem", "SPECIAL_TOKENS", "SYSTEM_PROMPT", "build_messages", "build_tiny_tokenizer",
    "encode_prompt", "encode_sft_example", "format_prompt", "generate_problems", "last_boxed",
    "load_problems", "load_tokenizer", "render_llama3", "save_jsonl", "sft_response",
    "split_gsm8k_answer", "split_problems", "stop_token_ids",
]
