"""The run's problems as the config chooses them: the training set, the held-out set and the
length limit every row must meet, with each bad input a ConfigError naming the key and the fix.

The held-out set is a deliberate choice (`data.heldout`), because an empty one silently gave
`before`/`after` = null and no last line:

    synthetic        generated with the training problems (only with data.train=synthetic)
    split:F | split:N   a fraction 0 < F < 1, or N problems, of the training set, held out of
                     training (problems sharing a text stay on one side; data.seed picks them)
    <file or hf:...> a held-out file, read like data.train
    none (or null)   no held-out evaluation; the run's last line says so

Every prompt is tokenized when the data loads and a row over `data.max_prompt_tokens` is rejected
with its location (file:line), like a malformed row: a 1 MB problem line used to reach SFT,
which does not go through the rollout's prompt limit, and run for many minutes.
"""
from __future__ import annotations

import os

from agro_megatron.config import ConfigError, DataConfig, heldout_choice

def heldout_line(d: DataConfig, before: float | None, after: float | None) -> str:
    """The run's last line: the held-out accuracy before and after training, or why there is none."""
    if before is None or after is None:
        return f"heldout_accuracy none (data.heldout={d.heldout}: no held-out evaluation)"
    return f"heldout_accuracy before={before:.4f} after={after:.4f}"


def prompt_limit(tokenizer, system_prompt: str | None, max_tokens: int):
    """A load_problems `check`: the reason a problem's prompt is over `max_tokens`, else None."""
    from agro_megatron.data import encode_prompt

    def check(problem) -> str | None:
        n = len(encode_prompt(problem, tokenizer, system_prompt=system_prompt))
        if n > max_tokens:
            return (f"the prompt has {n} tokens > data.max_prompt_tokens={max_tokens}; shorten or remove the row, "
                    "or raise data.max_prompt_tokens")
        return None

    return check


def select_problems(d: DataConfig, tokenizer, system_prompt: str | None, max_prompt_tokens: int):
    """(train, heldout) problems as `d` chooses them; every prompt within max_prompt_tokens."""
    from agro_megatron.data import generate_problems, split_problems

    kind, detail = heldout_choice(d)
    check = prompt_limit(tokenizer, system_prompt, max_prompt_tokens)
    if d.train == "synthetic":
        extra = d.synthetic_heldout_size if kind == "synthetic" else 0
        pool = generate_problems(d.synthetic_train_size + extra, seed=d.seed, levels=d.synthetic_levels,
                                 kinds=d.synthetic_kinds)
        too_long = [(p.id, why) for p in pool if (why := check(p))]
        if too_long:
            raise ConfigError(f"data.train=synthetic: {len(too_long)} generated problem(s) are too long, e.g. "
                              f"{too_long[0][0]}: {too_long[0][1]}")
        train, heldout = split_problems(pool, extra, seed=d.seed) if extra else (pool, [])
    else:
        train = _load("data.train", d.train, d, check)
    if kind == "split":
        try:
            train, heldout = split_problems(train, detail, seed=d.seed)
        except ValueError as err:
            raise ConfigError(f"data.heldout={d.heldout}: {err}; choose a smaller share") from None
        if not train or not heldout:
            raise ConfigError(f"data.heldout={d.heldout} leaves {len(train)} training and {len(heldout)} held-out "
                              f"problems of {len(train) + len(heldout)}; both need at least one: choose another share")
    elif kind == "file":
        heldout = _load("data.heldout", detail, d, check)
    elif kind == "none":
        heldout = []
    return train, heldout


def _load(key: str, source: str, d: DataConfig, check):
    """load_problems with its errors (malformed, unreadable or over-long rows, missing files) as
    ConfigError naming `key` and agro-train's own option for skipping rows."""
    from agro_megatron.data import load_problems

    try:
        return load_problems(source, skip_malformed=d.skip_malformed, check=check,
                             skip_option="data.skip_malformed=true")
    except (ValueError, OSError, ImportError) as err:  # MalformedRowError is a ValueError
        text = f"{source}: {err.strerror}" if isinstance(err, OSError) and err.strerror else str(err)
        if os.fspath(source) not in text:
            text = f"{source}: {text}"
        raise ConfigError(f"{key}: {text}") from None
