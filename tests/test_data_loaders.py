"""Loaders: every source format, malformed rows located by file:line, boxed extraction, GSM8K."""
import json
import re
import sys
import warnings
from pathlib import Path

import pytest

from agro_megatron.data import (
    MalformedRowError,
    MalformedRowWarning,
    Problem,
    generate_problems,
    last_boxed,
    load_problems,
    save_jsonl,
    split_gsm8k_answer,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

ROWS = [
    {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Area?", "solution": "So $\\boxed{\\frac{\\sqrt{3}}{4}}$.", "answer": "", "level": 5, "subject": "Geometry",
     "unique_id": "test/geometry/7.json"},
    {"problem": "Roots?", "solution": "They are 2 and 3.", "answer": "2, 3", "level": "Level ?"},
]


def _table_rows():
    """ROWS with one column set (None where absent) and string levels, as Arrow stores them."""
    keys = sorted({k for r in ROWS for k in r})
    return [{k: (str(r[k]) if k == "level" else r[k]) if k in r else None for k in keys} for r in ROWS]


def _check_rows(problems):
    assert [p.answer for p in problems] == ["2", "\\frac{\\sqrt{3}}{4}", "2, 3"]
    assert [p.level for p in problems] == [1, 5, None]
    assert [p.subject for p in problems] == ["Prealgebra", "Geometry", None]
    assert problems[1].id == "test/geometry/7.json"
    assert problems[0].problem == "What is $1+1$?"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{5}$.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$\\boxed{\\frac{\\sqrt{3}}{4}}$", "\\frac{\\sqrt{3}}{4}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
        ("an \\fbox{7} late", "7"),
        ("\\boxed{3} and later \\fbox{4}", "4"),
        ("MATH's bare form $\\boxed 5$.", "5"),
        ("\\boxed{ (1, 2) }", "(1, 2)"),
        ("unbalanced \\boxed{\\frac{1}{2}", None),
        ("last one unbalanced falls back \\boxed{9} \\boxed{1", "9"),
        ("\\boxedx{3}", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_jsonl_json_parquet_and_json_lines_agree(tmp_path):
    _check_rows(load_problems(_write_jsonl(tmp_path / "a.jsonl", ROWS)))
    (tmp_path / "b.json").write_text(json.dumps(ROWS, indent=2))
    _check_rows(load_problems(tmp_path / "b.json"))
    # datasets' to_json writes JSON Lines under a .json name
    _check_rows(load_problems(_write_jsonl(tmp_path / "c.json", ROWS)))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(_table_rows()), tmp_path / "d.parquet")
    _check_rows(load_problems(tmp_path / "d.parquet"))
    assert len(load_problems(tmp_path / "a.jsonl", limit=2)) == 2


def test_jsonl_malformed_rows_name_file_and_line(tmp_path):
    good = {"problem": "p", "answer": "1"}
    lines = [
        json.dumps(good),
        json.dumps({"solution": "no problem field \\boxed{1}", "answer": "1"}),  # line 2: no format
        "{not json",  # line 3
        "",  # blank lines are not rows
        json.dumps({"problem": "p", "solution": "unbalanced \\boxed{1"}),  # line 5
        json.dumps({"problem": "p", "solution": "no box"}),  # line 6
        json.dumps({"problem": "p", "solution": "empty \\boxed{ }"}),  # line 7
        json.dumps(["a", "list"]),  # line 8
        json.dumps({**good, "problem": "q"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedRowError) as err:
        load_problems(path)
    assert f"{path}:2:" in str(err.value) and "skip_malformed=True" in str(err.value)
    with pytest.warns(MalformedRowWarning) as record:
        problems = load_problems(path, skip_malformed=True)
    assert [p.problem for p in problems] == ["p", "q"]
    located = [str(w.message).split(": ")[0] for w in record]
    assert located == [f"{path}:{i}" for i in (2, 3, 5, 6, 7, 8)]
    assert "balanced braces" in str(record[2].message)


def test_json_array_malformed_row_line(tmp_path):
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}, {"problem": "", "answer": "3"}]
    text = json.dumps(rows, indent=2)
    path = tmp_path / "rows.json"
    path.write_text(text)
    # the third object starts on the line holding its opening brace
    lines = text.splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.strip() == "{"]
    with pytest.raises(MalformedRowError, match=f"{path}:{starts[2]}: .*empty 'problem'"):
        load_problems(path)
    with pytest.warns(MalformedRowWarning):
        assert [p.answer for p in load_problems(path, skip_malformed=True)] == ["1", "2"]
    path.write_text('[{"problem": "a", "answer": "1"},\n {"problem": "b" "answer": "2"}]')
    with pytest.raises(MalformedRowError, match=f"{path}:2: invalid JSON"):
        load_problems(path, skip_malformed=True)


def test_parquet_malformed_row_is_located(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"problem": "a", "solution": "\\boxed{1}"}, {"problem": "b", "solution": "none"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    with pytest.raises(MalformedRowError, match=r"x\.parquet row 1: "):
        load_problems(tmp_path / "x.parquet")


def test_gsm8k_format_and_sample_file():
    solution, answer = split_gsm8k_answer("He has 3 * 4 = <<3*4=12>>12.\n#### 1,200")
    assert (solution, answer) == ("He has 3 * 4 = 12.", "1200")
    problems = load_problems(EXAMPLES / "gsm8k_sample.jsonl")
    assert len(problems) == 10
    for p in problems:
        assert p.subject == "gsm8k" and "<<" not in p.solution and "####" not in p.solution
        # the final answer is the result of the solution's last calculation
        assert re.findall(r"= (\d+(?:\.\d+)?)", p.solution)[-1] == p.answer
    assert problems[8].answer == "1500"


def test_gsm8k_missing_marker_and_format_override(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker 5"}])
    with pytest.raises(MalformedRowError, match=f"{path}:1: .*####"):
        load_problems(path)
    with pytest.raises(MalformedRowError, match="'problem'"):
        load_problems(_write_jsonl(tmp_path / "h.jsonl", [{"question": "q", "answer": "#### 3"}]), fmt="math")


def test_shipped_math_sample():
    problems = load_problems(EXAMPLES / "math_sample.jsonl")
    assert len(problems) >= 20 and len({p.id for p in problems}) == len(problems)
    assert {p.level for p in problems} <= {1, 2, 3, 4, 5}
    for p in problems:
        assert last_boxed(p.solution) == p.answer, p.id  # the answer field agrees with the box


def test_save_jsonl_round_trip(tmp_path):
    problems = generate_problems(30, seed=4)
    loaded = load_problems(save_jsonl(problems, tmp_path / "s.jsonl"))
    assert loaded == problems  # meta is not compared


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf:OWNER/NAME"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_problems(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="split"):
        load_problems(_write_jsonl(tmp_path / "a.jsonl", ROWS), split="test")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_problems(tmp_path / "folder")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(_write_jsonl(tmp_path / "empty.jsonl", []))


def test_missing_datasets_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_problems("hf:HuggingFaceH4/MATH-500")


def test_saved_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_table_rows())
    ds.save_to_disk(str(tmp_path / "single"))
    _check_rows(load_problems(tmp_path / "single"))
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_problems(tmp_path / "dict", split="test")) == 1
    with pytest.raises(ValueError, match=r"choose one with split"):
        load_problems(tmp_path / "dict")
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_problems(tmp_path / "dict", split="validation")


def test_hub_source_calls_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "x #### 7"}, {"question": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(MalformedRowError, match=r"hf:openai/gsm8k:main\[test\] row 1: "):
        load_problems("hf:openai/gsm8k:main")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        problems = load_problems("hf:openai/gsm8k:main", split="train", skip_malformed=True)
    assert problems == [Problem(id="gsm8k:main-0", problem="q", answer="7", solution="x", subject="gsm8k")]
    assert calls == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
