"""Eval harness: pass@k against subset enumeration, the metrics table on a fake model, the
responses-file and --model paths of agro-eval."""
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

from agro_megatron import eval as harness
from agro_megatron.cli.eval import main
from agro_megatron.data import Problem, build_tiny_tokenizer, format_prompt, load_problems
from agro_megatron.eval import evaluate, load_responses, score_responses

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def exact_match_score(responses, truths):
    """Independent stand-in for the MATH reward: text after the last marker equals the truth."""
    out = []
    for r, t in zip(responses, truths):
        tail = r.rsplit("The final answer is", 1)
        out.append(float(len(tail) == 2 and tail[1].strip().rstrip(".") == t))
    return out


def _problems():
    levels = [1, 1, 2, 2, 3, None]
    subjects = ["Algebra", "Geometry", "Algebra", None, "Algebra", "Geometry"]
    return [Problem(id=f"q{i}", problem=f"What is {i} + {i}?", answer=str(2 * i), level=lv, subject=s)
            for i, (lv, s) in enumerate(zip(levels, subjects))]


N = 4
CORRECT = [4, 0, 1, 2, 3, 1]  # correct responses per problem


def fake_generate(prompts, n, temperature):
    """Problem i answers right on its first CORRECT[i] samples; lengths differ per sample."""
    out = []
    for prompt in prompts:
        i = int(prompt.split("What is ")[1].split(" ")[0])
        out.append([("x" * j) + f"The final answer is {2 * i if j < CORRECT[i] else -1}" for j in range(n)])
    return out


def _expected(indices, k):
    return (
        sum(CORRECT[i] for i in indices) / (N * len(indices)),
        sum(1 - math.comb(N - CORRECT[i], k) / math.comb(N, k) for i in indices) / len(indices),
    )


def test_evaluate_table_on_fake_model(tmp_path):
    problems = _problems()
    seen = []

    def generate(prompts, n, temperature):
        seen.append((len(prompts), n, temperature))
        return fake_generate(prompts, n, temperature)

    report = evaluate(generate, problems, n=N, temperature=0.7, k_values=[1, 2, 4], score_fn=exact_match_score,
                      batch_size=4, keep_responses=True, progress=False)
    assert seen == [(4, N, 0.7), (2, N, 0.7)]
    groups = {"all": range(6), "level 1": [0, 1], "level 2": [2, 3], "level 3": [4], "level unknown": [5],
              "subject Algebra": [0, 2, 4], "subject Geometry": [1, 5], "subject unknown": [3]}
    stats = {"all": report.overall, **{f"level {k}": v for k, v in report.by_level.items()},
             **{f"subject {k}": v for k, v in report.by_subject.items()}}
    assert list(stats) == list(groups)
    for name, indices in groups.items():
        for k in (1, 2, 4):
            acc, pk = _expected(indices, k)
            assert stats[name].accuracy == pytest.approx(acc) and stats[name].pass_at_k[k] == pytest.approx(pk)
        assert stats[name].num_samples == N * len(indices)
    assert report.overall.pass_at_k[1] == pytest.approx(report.overall.accuracy)
    # lengths in characters: sample j has j filler characters before the sentence
    chars = [len(r) for rs in fake_generate([format_prompt(p) for p in problems], N, 0) for r in rs]
    assert report.overall.mean_length == pytest.approx(sum(chars) / len(chars))
    assert report.config["length_unit"] == "chars" and report.overall.marker_rate == 1.0

    table = report.format_table()
    assert table.splitlines()[0].split() == ["group", "problems", "samples", "accuracy", "pass@1", "pass@2", "pass@4",
                                             "len(chars)", "marker"]
    assert "level unknown" in table and "subject Geometry" in table
    saved = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert saved["overall"]["pass_at_k"]["2"] == pytest.approx(_expected(range(6), 2)[1])
    assert saved["problems"][3]["num_correct"] == 2 and len(saved["problems"][3]["responses"]) == N
    assert saved["config"]["temperature"] == 0.7


def test_lengths_in_tokens_with_a_tokenizer():
    class WordTokenizer:  # counts whitespace-separated words
        chat_template = None
        bos_token = "<|begin_of_text|>"

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [t.split() for t in texts]}

    problems = _problems()[:2]
    report = score_responses(problems, [["a b c", "a"], ["a b", "The final answer is 2"]], k_values=[2],
                             score_fn=exact_match_score, tokenizer=WordTokenizer(), progress=False)
    assert report.config["length_unit"] == "tokens" and report.overall.mean_length == pytest.approx(11 / 4)
    assert report.overall.accuracy == pytest.approx(1 / 4) and report.overall.pass_at_k[2] == pytest.approx(0.5)
    assert report.overall.marker_rate == pytest.approx(1 / 4)


def test_contract_violations_are_explained():
    problems = _problems()[:2]
    with pytest.raises(ValueError, match="k_values"):
        evaluate(fake_generate, problems, n=2, k_values=[4], score_fn=exact_match_score, progress=False)
    with pytest.raises(ValueError, match="for 2 prompts"):
        evaluate(lambda p, n, t: [["a"]], problems, n=1, score_fn=exact_match_score, progress=False)
    with pytest.raises(ValueError, match="list of 2 strings"):
        evaluate(lambda p, n, t: [["a"], ["b"]], problems, n=2, score_fn=exact_match_score, progress=False)
    with pytest.raises(ValueError, match="2 scores for 1 responses"):
        score_responses(problems[:1], [["a"]], score_fn=lambda r, t: [1.0, 0.0], progress=False)


def test_load_responses_matches_ids(tmp_path):
    problems = _problems()[:3]
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "q2", "responses": ["c"]}\n{"id": "q0", "response": "a"}\n\n{"id": "q1", "responses": ["b", "b2"]}\n')
    assert load_responses(path, problems) == [["a"], ["b", "b2"], ["c"]]
    path.write_text('{"id": "q0", "responses": ["a"]}\n{"id": "zz", "responses": ["b"]}\n')
    with pytest.raises(ValueError, match=r"missing ids \['q1', 'q2'\], unknown ids \['zz'\]"):
        load_responses(path, problems)
    path.write_text('{"id": "q0", "responses": "not a list"}\n')
    with pytest.raises(ValueError, match=f"{path}:1: expected"):
        load_responses(path, problems)


def test_cli_with_responses_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "default_score_fn", lambda **kw: exact_match_score)
    problems = load_problems(EXAMPLES / "math_sample.jsonl")
    responses = tmp_path / "responses.jsonl"
    with open(responses, "w") as f:
        for i, p in enumerate(problems):  # problem i: right on the first i % 3 of 3 samples
            rs = [f"The final answer is {p.answer if j < i % 3 else 'wrong'}" for j in range(3)]
            f.write(json.dumps({"id": p.id, "responses": rs}) + "\n")
    out = tmp_path / "results.json"
    assert main(["--data", str(EXAMPLES / "math_sample.jsonl"), "--responses", str(responses), "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["k_values"] == [1, 3] and result["config"]["n"] == 3
    expected_acc = sum(i % 3 for i in range(len(problems))) / (3 * len(problems))
    assert result["overall"]["accuracy"] == pytest.approx(expected_acc)
    assert result["overall"]["pass_at_k"]["3"] == pytest.approx(sum(i % 3 > 0 for i in range(len(problems))) / len(problems))
    assert "subject Number Theory" in capsys.readouterr().out


def test_cli_model_path_uses_rollout_factory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "default_score_fn", lambda **kw: exact_match_score)
    monkeypatch.setitem(sys.modules, "agro_megatron.rollout", types.SimpleNamespace())
    model_dir = build_tiny_tokenizer(tmp_path / "model")  # a checkpoint folder holds its tokenizer
    args = ["--data", str(EXAMPLES / "gsm8k_sample.jsonl"), "--model", str(model_dir), "--no-progress"]
    assert main(args) == 2
    assert "make_generate_fn" in capsys.readouterr().err

    calls = {}

    def make_generate_fn(model_dir, **options):
        calls.update(options, model_dir=model_dir)
        return lambda prompts, n, t: [["The final answer is 16"] * n for _ in prompts]

    monkeypatch.setitem(sys.modules, "agro_megatron.rollout", types.SimpleNamespace(make_generate_fn=make_generate_fn))
    out = tmp_path / "r.json"
    assert main(args[:-1] + ["--n", "2", "--temperature", "0.5", "--out", str(out), "--no-progress",
                             "--tokenizer", "none"]) == 2  # a bad tokenizer folder is reported
    assert "not a folder" in capsys.readouterr().err
    assert main(args[:-1] + ["--n", "2", "--temperature", "0.5", "--out", str(out), "--no-progress"]) == 0
    assert calls["model_dir"] == str(model_dir) and calls["max_new_tokens"] == 1024
    assert calls["tokenizer"] is not None and calls["engine"] == "native"
    result = json.loads(out.read_text())
    assert result["overall"]["accuracy"] == pytest.approx(0.1)  # only the first GSM8K answer is 16
    assert result["config"]["temperature"] == 0.5 and result["config"]["length_unit"] == "tokens"


def test_default_scorer_with_the_math_reward():
    pytest.importorskip("agro_megatron.rewards.math")
    problems = load_problems(EXAMPLES / "math_sample.jsonl")[:6]
    responses = [[f"Steps. The final answer is {p.answer}.", "The final answer is 123456"] for p in problems]
    report = score_responses(problems, responses, k_values=[1, 2], progress=False)
    assert report.overall.accuracy == pytest.approx(0.5) and report.overall.pass_at_k[2] == 1.0


# --- bad inputs: each a named error before any work (issue 17) ---------------------------------
def _no_scoring(monkeypatch):
    """A scorer that fails the test if called: the checks must come before any work."""
    def score_fn(**kw):
        raise AssertionError("scoring started before the inputs were checked")
    monkeypatch.setattr(harness, "default_score_fn", score_fn)


def _responses_file(tmp_path):
    problems = load_problems(EXAMPLES / "math_sample.jsonl")
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "responses": [p.answer]}) + "\n" for p in problems))
    return path


def test_cli_out_that_cannot_be_written_fails_before_any_work(tmp_path, monkeypatch, capsys):
    _no_scoring(monkeypatch)
    base = ["--data", str(EXAMPLES / "math_sample.jsonl"), "--responses", str(_responses_file(tmp_path)),
            "--no-progress", "--out"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [(tmp_path, "is a directory"), (a_file / "r.json", "cannot be written")]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "r.json", "cannot be written"))
    for out, why in cases:
        assert main(base + [str(out)]) == 2
        captured = capsys.readouterr()
        assert f"--out {out}" in captured.err and why in captured.err and "Traceback" not in captured.err
        assert captured.out == ""  # no table printed before the error
    assert a_file.read_text() == "x"


def test_cli_model_without_tokenizer_files_is_named(tmp_path, monkeypatch, capsys):
    _no_scoring(monkeypatch)
    factory = {}
    monkeypatch.setitem(sys.modules, "agro_megatron.rollout",
                        types.SimpleNamespace(make_generate_fn=lambda *a, **kw: factory.setdefault("called", True)))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # weights' side only: no tokenizer files
    assert main(["--data", str(EXAMPLES / "gsm8k_sample.jsonl"), "--model", str(model_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--model {model_dir} has no tokenizer files" in err and "pass --tokenizer DIR" in err
    assert not factory  # nothing was loaded or generated


def test_batch_size_zero_is_rejected(tmp_path, monkeypatch, capsys):
    _no_scoring(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(EXAMPLES / "math_sample.jsonl"), "--responses", str(_responses_file(tmp_path)),
              "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size: must be an integer >= 1, got '0'" in capsys.readouterr().err
    problems = load_problems(EXAMPLES / "math_sample.jsonl")[:2]
    for bad in (0, -1, True):
        with pytest.raises(harness.EvalInputError, match="batch_size"):
            score_responses(problems, [["1"], ["2"]], score_fn=exact_match_score, batch_size=bad, progress=False)
        with pytest.raises(harness.EvalInputError, match="batch_size"):
            evaluate(lambda ps, n, t: [["1"] * n for _ in ps], problems, score_fn=exact_match_score,
                     batch_size=bad, progress=False)
