"""What a user types and feeds in: every bad value, file or row stops the job before work starts
with a named error (key or file:line, and the fix), and the CLI prints it in one line, exit 2.

Issue 17 items 6 (bools), 7 (held-out choice), 8 (ranges), 9 (over-long rows) and the named
errors that used to be tracebacks (YAML, a directory as config, non-UTF-8 and malformed rows, an
unwritable logging dir, the world-size message at tp=2 pp=2).
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from agro_megatron.config import ConfigError, JobConfig
from agro_megatron.data import MalformedRowError, MalformedRowWarning, encode_prompt, load_problems
from agro_megatron.testing.distributed import launcher_free_env

ROOT = Path(__file__).resolve().parents[1]


def load(*overrides, path=None):
    return JobConfig.load(path, list(overrides))


def _numeric_keys():
    """Every int/float field of the config, enumerated from the dataclasses themselves."""
    out = []
    for section in dataclasses.fields(JobConfig):
        cls = typing.get_type_hints(JobConfig)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            if args[0] in (int, float):
                out.append((f"{section.name}.{f.name}", args[0]))
    return out


NUMERIC = _numeric_keys()
SEEDS = {"data.seed", "train.seed"}  # any integer is a seed


def test_enumeration_sees_the_config():
    keys = dict(NUMERIC)
    assert keys["optim.lr"] is float and keys["train.steps"] is int and keys["parallel.dp"] is int
    assert len(keys) >= 40


# -- item 6: no bool passes for a number ---------------------------------------------------------
@pytest.mark.parametrize("key", [k for k, _ in NUMERIC])
def test_a_bool_is_never_a_number(key):
    for value in ("true", "false", "yes", "on"):
        with pytest.raises(ConfigError, match=rf"{key}=(True|False): expected a number, got a boolean"):
            load(f"{key}={value}")


def test_bools_inside_lists_and_tiny_are_refused():
    with pytest.raises(ConfigError, match="model.tiny.hidden_size=True"):
        load("model.tiny={hidden_size: true, intermediate_size: 128, num_layers: 2, num_heads: 4, "
             "num_kv_heads: 2, head_dim: 16}").validate()
    with pytest.raises(ConfigError, match="data.synthetic_levels"):
        load("data.synthetic_levels=[true]").validate()
    with pytest.raises(ConfigError, match="data.heldout=True: expected a string"):
        load("data.heldout=yes")


# -- item 8: every number's range is checked in validate -----------------------------------------
@pytest.mark.parametrize("override,key", [
    ("rollout.temperature=0", "rollout.temperature"),
    ("algorithm.beta=.nan", "algorithm.beta"),
    ("algorithm.beta=nan", "algorithm.beta"),
    ("algorithm.beta=.inf", "algorithm.beta"),
    ("algorithm.beta=inf", "algorithm.beta"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-4", "optim.lr"),
    ("train.prompts_per_step=0", "train.prompts_per_step"),
    ("train.steps=-1", "train.steps"),
    ("eval.n=0", "eval.n"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("optim.min_lr=1", "optim.min_lr"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("optim.adam_beta2=1", "optim.adam_beta2"),
])
def test_issue_values_are_rejected_by_validate(override, key):
    with pytest.raises(ConfigError, match=key):
        load(override).validate()


@pytest.mark.parametrize("key,kind", [(k, t) for k, t in NUMERIC if k not in SEEDS])
def test_every_number_rejects_out_of_domain_values(key, kind):
    """Same class of hole in every numeric field: nan/inf for floats, a negative for every one
    (no count, size, rate, probability or timeout in this config may be negative)."""
    bad = ["-1"] + ([".nan", ".inf", "-.inf"] if kind is float else [])
    for value in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load(f"{key}={value}").validate()


def test_defaults_and_edges_still_validate():
    load().validate(world_size=1)
    load("rollout.top_p=1", "eval.temperature=0", "train.steps=0", "sft.steps=0", "algorithm.replay_p=0",
         "optim.clip_grad=0", "rollout.top_k=0", "eval.every=0").validate()
    assert math.isfinite(load("algorithm.beta=0.05").validate().algorithm.beta)


@pytest.mark.parametrize("tiny,fragment", [
    ("{hidden_sise: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
     "unknown key model.tiny.hidden_sise: did you mean model.tiny.hidden_size"),
    ("{hidden_size: 64}", "model.tiny is missing intermediate_size"),
    ("{hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 3, head_dim: 16}",
     "not a multiple of num_kv_heads=3"),
    ("{hidden_size: 0, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}",
     "model.tiny.hidden_size=0"),
])
def test_model_tiny_keys_are_checked(tiny, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(f"model.tiny={tiny}").validate()


def test_tiny_arch_takes_optional_keys():
    from agro_megatron.train.model_setup import arch_for_job

    cfg = load("model.tiny={hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, "
               "num_kv_heads: 2, head_dim: 16, max_position_embeddings: 77}").validate()
    arch = arch_for_job(cfg, vocab_size=100)
    assert (arch.hidden_size, arch.max_position_embeddings, arch.rope_theta) == (64, 77, 500000.0)


# -- YAML, directories, world size -------------------------------------------------------------
def test_yaml_errors_name_the_file_line_or_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\nrollout: {n: 2}\n")
    with pytest.raises(ConfigError, match=rf"{bad}: not valid YAML \(line \d+, column \d+"):
        load(path=str(bad))
    with pytest.raises(ConfigError, match=r"override 'model.tiny=\{hidden_size: 3': the value is not valid YAML"):
        load("model.tiny={hidden_size: 3")
    with pytest.raises(ConfigError, match="is a directory: pass a YAML file"):
        load(path=str(tmp_path))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"logging: {dir: caf\xe9}\n")
    with pytest.raises(ConfigError, match=f"{latin}: not UTF-8"):
        load(path=str(latin))


def test_world_mismatch_at_tp2_pp2_says_how_many_processes():
    for world in (1, 2, 3):
        with pytest.raises(ConfigError) as err:
            load("parallel.tp=2", "parallel.pp=2").validate(world_size=world)
        assert "launch a multiple of 4 processes" in str(err.value) and "launch 0" not in str(err.value)
    load("parallel.tp=2", "parallel.pp=2", "train.prompts_per_step=2").validate(world_size=8)  # DP = 2


def test_unwritable_logging_dir_is_named(tmp_path):
    from agro_megatron.config import check_writable_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"logging.dir='{blocker}/run' cannot be written \(.*Error"):
        check_writable_dir("logging.dir", str(blocker / "run"))
    check_writable_dir("logging.dir", str(tmp_path / "fresh" / "run"))
    assert os.listdir(tmp_path / "fresh" / "run") == []  # the probe leaves nothing behind


# -- data rows: non-UTF-8, malformed, over-long (item 9), held-out choice (item 7) ---------------
def _rows(path, problems):
    path.write_text("".join(json.dumps({"problem": p, "answer": str(i)}) + "\n" for i, p in enumerate(problems)))
    return path


def test_non_utf8_rows_name_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n'
                     b'{"problem": "b\xe2\x80\xa8c", "answer": "3"}\n')
    with pytest.raises(MalformedRowError, match=rf"{path}:2: malformed row: not UTF-8 text"):
        load_problems(path)
    with pytest.warns(MalformedRowWarning, match=f"{path}:2"):
        kept = load_problems(path, skip_malformed=True)
    # U+2028 inside a JSON string is not a line break of the file
    assert [(p.problem, p.meta["where"]) for p in kept] == [("a", f"{path}:1"), ("b\u2028c", f"{path}:3")]
    arr = tmp_path / "arr.json"
    arr.write_bytes(b'[\n{"problem": "a", "answer": "1"},\n{"problem": "caf\xe9", "answer": "2"}\n]')
    with pytest.raises(MalformedRowError, match=rf"{arr}:3: not UTF-8 text"):
        load_problems(arr)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from agro_megatron.data import build_tiny_tokenizer, load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(str(d), seed=0)
    return load_tokenizer(str(d))


def _data(**kw):
    from agro_megatron.config import DataConfig

    return DataConfig(**kw)


def test_long_rows_are_rejected_when_data_loads_with_their_lines(tmp_path, tokenizer):
    from agro_megatron.train.inputs import select_problems

    long_text = "What is " + " + ".join(["12345"] * 40_000) + "?"  # ~280 kB on one line
    texts = ["What is 1 + 1?", long_text, "What is 2 + 2?", "What is 3 + " + "4 + " * 200 + "5?"]
    path = _rows(tmp_path / "t.jsonl", texts)
    from agro_megatron.data import Problem

    lengths = [len(encode_prompt(Problem("x", t, "1"), tokenizer, system_prompt=None)) for t in texts]
    limit = 64
    over = [i + 1 for i, n in enumerate(lengths) if n > limit]
    assert over == [2, 4]  # the reference: token counts of the very prompts, one by one
    d = _data(train=str(path), heldout="none")
    with pytest.raises(ConfigError, match=rf"data.train: {path}:2: malformed row: the prompt has {lengths[1]} tokens "
                                          rf"> data.max_prompt_tokens={limit}.*data.skip_malformed=true"):
        select_problems(d, tokenizer, None, limit)
    d = _data(train=str(path), heldout="none", skip_malformed=True)
    with pytest.warns(MalformedRowWarning) as record:
        train, heldout = select_problems(d, tokenizer, None, limit)
    assert [str(w.message).split(": ")[0] for w in record] == [f"{path}:{i}" for i in over]
    assert [p.problem for p in train] == [texts[0], texts[2]] and heldout == []


def test_sft_rejects_rows_longer_than_the_context_before_a_model_exists(tokenizer):
    from agro_megatron.data import Problem, encode_sft_example
    from agro_megatron.train.context import RunData
    from agro_megatron.train.sft import sft_examples

    problems = [Problem("a", "What is 1 + 1?", "2", solution="1 + 1 = 2.", meta={"where": "f.jsonl:1"}),
                Problem("b", "What is 2 + 2?", "4", solution="2 + 2 = " + "1 + " * 300 + "4.",
                        meta={"where": "f.jsonl:2"})]
    data = RunData(tokenizer=tokenizer, tokenizer_dir="", train_problems=problems, heldout_problems=[],
                   system_prompt=None, max_prompt_tokens=64)
    sizes = [sum(map(len, encode_sft_example(p, tokenizer, system_prompt=None))) for p in problems]
    assert sizes[0] <= 128 < sizes[1]
    run = types.SimpleNamespace(data=data, arch=types.SimpleNamespace(max_position_embeddings=128))
    with pytest.raises(ConfigError, match=rf"1 row\(s\) .* context of 128 tokens .*f.jsonl:2 \({sizes[1]} tokens\)"):
        sft_examples(run)
    run.data = dataclasses.replace(data, train_problems=problems[:1])
    assert [len(a) + len(b) for a, b in sft_examples(run)] == sizes[:1]


def test_file_training_data_needs_a_deliberate_heldout_choice(tmp_path):
    path = _rows(tmp_path / "t.jsonl", ["a", "b"])
    with pytest.raises(ConfigError, match="data.heldout=synthetic only goes with data.train=synthetic.*split:0.1"):
        load(f"data.train={path}").validate()
    for choice in ("none", "null", "split:0.5", "split:1", str(path)):
        load(f"data.train={path}", f"data.heldout={choice}").validate()
    for bad in ("split:0", "split:1.0", "split:-0.2", "split:abc"):
        with pytest.raises(ConfigError, match=f"data.heldout='{bad}': write split:"):
            load(f"data.train={path}", f"data.heldout={bad}").validate()


def test_heldout_split_file_and_none(tmp_path, tokenizer):
    from agro_megatron.train.inputs import heldout_line, select_problems

    texts = [f"What is {i} + {i}?" for i in range(10)]
    path = _rows(tmp_path / "t.jsonl", texts)
    for spec, n_held in (("split:0.3", 3), ("split:4", 4)):
        train, held = select_problems(_data(train=str(path), heldout=spec, seed=3), tokenizer, None, 256)
        assert len(held) == n_held and len(train) == 10 - n_held
        assert sorted(p.problem for p in train + held) == sorted(texts)  # a partition of the file
        again = select_problems(_data(train=str(path), heldout=spec, seed=3), tokenizer, None, 256)
        assert [p.id for p in again[1]] == [p.id for p in held]  # data.seed decides, reproducibly
    other = _rows(tmp_path / "h.jsonl", ["What is 9 + 1?"])
    train, held = select_problems(_data(train=str(path), heldout=str(other)), tokenizer, None, 256)
    assert len(train) == 10 and [p.problem for p in held] == ["What is 9 + 1?"]
    train, held = select_problems(_data(train=str(path), heldout="none"), tokenizer, None, 256)
    assert len(train) == 10 and held == []
    with pytest.raises(ConfigError, match="split:20.*asks for 20 of 10"):
        select_problems(_data(train=str(path), heldout="split:20"), tokenizer, None, 256)
    assert heldout_line(_data(heldout="none"), None, None) == \
        "heldout_accuracy none (data.heldout=none: no held-out evaluation)"
    assert heldout_line(_data(), 0.25, 0.5) == "heldout_accuracy before=0.2500 after=0.5000"
    # synthetic (the demo) is unchanged: train_size + heldout_size problems, split by data.seed
    train, held = select_problems(_data(), tokenizer, None, 256)
    assert (len(train), len(held)) == (70, 30)


# -- the CLI: one line, exit 2, no traceback -----------------------------------------------------
def _agro_train(args, cwd):
    script = os.path.join(os.path.dirname(sys.executable), "agro-train")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "agro_megatron.cli.train"]
    return subprocess.run(cmd + args, cwd=cwd, env=launcher_free_env(), capture_output=True, text=True,
                          timeout=300)


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("agro-train: ")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_cli_bad_data_rows_are_one_line_named_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"problem": "What is 1 + 1?", "answer": "2"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    line = _one_line_error(_agro_train([f"data.train={path}", "data.heldout=none", "sft.steps=0",
                                        f"logging.dir={tmp_path / 'run'}"], tmp_path),
                           f"data.train: {path}:2: malformed row: not UTF-8", "data.skip_malformed=true")
    assert "--skip-malformed" not in line


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    from agro_megatron.cli.train import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {steps: 3\n")
    cases = [([str(tmp_path)], "is a directory"), ([str(bad_yaml)], "not valid YAML"),
             (["optim.lr=true"], "got a boolean"), (["rollout.temperature=0"], "rollout.temperature=0.0"),
             ([f"logging.dir={blocker}/run"], "logging.dir="),
             (["parallel.tp=2", "parallel.pp=2"], "launch a multiple of 4 processes")]
    try:
        for argv, fragment in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("agro-train: ") and fragment in err and err.count("\n") == 1, err
    finally:
        from agro_megatron.cli.job import destroy_process_groups

        destroy_process_groups()


@pytest.mark.slow
def test_torchrun_rank_errors_print_the_named_error_without_a_traceback(tmp_path):
    """Two ranks (gloo) both stop on the malformed row: each prints the one-line message and no
    `[rank0]: Traceback`."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n{"problem": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "-m", "agro_megatron.train", f"data.train={path}", "data.heldout=none", "sft.steps=0",
                           "train.prompts_per_step=2", f"logging.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=launcher_free_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr
    named = [ln for ln in proc.stderr.splitlines() if f"data.train: {path}:2: malformed row" in ln]
    assert len(named) == 2, proc.stderr
