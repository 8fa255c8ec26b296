"""agro-study: spec parsing and its errors, cell ids, cell directories, resume semantics, the report
on synthetic run directories with known numbers, and the Slurm scripts.

The runner's tests use a fake trainer (a small Python script standing in for
`python -m agro_megatron.train`) whose behaviour each test sets through a file; one slow test runs
the real trainer on a 2-rank (DP=2) cell to check the per-problem evaluation record end to end.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from agro_megatron.config import JobConfig
from agro_megatron.study import cells as C
from agro_megatron.study import slurm as S
from agro_megatron.study.report import ReportInputs, build_report, write_report
from agro_megatron.study.spec import SpecError, cell_requests, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny_cpu.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def spec_file(tmp_path: Path, body: str, name: str = "study.yaml") -> Path:
    return write(tmp_path / name, f"base: {TINY}\n" + textwrap.dedent(body))


# --------------------------------------------------------------------------------------------- spec
def test_axes_product_and_zip_expand_to_the_right_cells(tmp_path):
    spec = load_spec(spec_file(tmp_path, """
        seeds: [1, 2, 3]
        axes:
          beta: [algorithm.beta=0.01, algorithm.beta=0.1]
          lr: [optim.lr=1e-4, optim.lr=3e-4, "optim.lr=1e-3 optim.warmup_steps=2"]
        arms:
          a: {overrides: [algorithm.estimator=agro_on]}
          b:
            overrides: [algorithm.estimator=rloo]
            combine: zip
            axes: {beta: [algorithm.beta=0.01, algorithm.beta=0.1], lr: [optim.lr=1e-4, optim.lr=3e-4]}
    """))
    reqs = cell_requests(spec)
    a = [r for r in reqs if r.arm == "a"]
    b = [r for r in reqs if r.arm == "b"]
    assert len(a) == 2 * 3 * 3 and len(b) == 2 * 3
    assert {r.point for r in b} == {"beta=0.01,lr=1e-4", "beta=0.1,lr=3e-4"}
    one = next(r for r in a if r.point == "beta=0.1,lr=1e-3,warmup_steps=2" and r.seed == 2)
    # order: study < arm < point < seed, so later ones win
    assert one.overrides == ("algorithm.estimator=agro_on", "algorithm.beta=0.1", "optim.lr=1e-3",
                             "optim.warmup_steps=2", "train.seed=2")
    assert one.group == "a[beta=0.1,lr=1e-3,warmup_steps=2]"


@pytest.mark.parametrize("body, message", [
    ("arms: {a: {overides: [x.y=1]}}", "unknown key arms.a.overides; did you mean arms.a.overrides?"),
    ("seedz: [1]", "unknown key seedz; did you mean seeds?"),
    ("axes: {beta: []}", "axes.beta is empty"),
    ("combine: zip\naxes: {a: [train.steps=1, train.steps=2], b: [optim.lr=1]}", "different lengths (a: 2, b: 1)"),
    ("overrides: [train.steps]", "not a dotted key=value override"),
    ("overrides: [logging.dir=/x]", "logging.dir is set by agro-study"),
    ("seeds: [1, 1]", "repeats a seed"),
    ("seeds: [1.5]", "every seed must be an integer"),
    ("baseline: nope\narms: {a: {}}", "baseline 'nope' is not an arm"),
    ("arms: {on: {}}", "is not a string; quote it"),
    ("resources: {time_limit: soon}", "is not a Slurm time"),
    ("resources: {nodes: 0}", "resources.nodes=0 must be an integer >= 1"),
    ("arms: {a: {resources: {plan: {gpu: H100}}}}", "plan must be a mapping with at least `model`"),
])
def test_spec_errors_name_the_key_and_the_fix(tmp_path, body, message):
    path = spec_file(tmp_path, body)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_base_and_missing_spec_are_named(tmp_path):
    with pytest.raises(SpecError, match="base config .* not found"):
        parse_spec({"base": "nothere.yaml"}, str(tmp_path / "s.yaml"))
    with pytest.raises(SpecError, match="not found"):
        load_spec(str(tmp_path / "absent.yaml"))


def test_cell_config_is_checked_by_the_trainers_validation(tmp_path):
    spec = load_spec(spec_file(tmp_path, "arms: {bad: {overrides: [rollout.n=1]}}"))
    with pytest.raises(C.CellConfigError, match=r"cell bad seed=None: rollout.n=1: AGRO's leave-one-out"):
        C.resolve_cells(spec, tmp_path / "st")
    spec = load_spec(spec_file(tmp_path, "arms: {typo: {overrides: [algorithm.betta=1]}}"))
    with pytest.raises(C.CellConfigError, match="did you mean algorithm.beta"):
        C.resolve_cells(spec, tmp_path / "st")
    # the world size is the cell's: 2 ranks (DP=2) cannot split 3 prompts per step
    spec = load_spec(spec_file(tmp_path, "resources: {procs_per_node: 2}\noverrides: [train.prompts_per_step=3]"))
    with pytest.raises(C.CellConfigError, match="not divisible by DP=2"):
        C.resolve_cells(spec, tmp_path / "st")


def test_two_requests_with_one_config_are_refused(tmp_path):
    spec = load_spec(spec_file(tmp_path, "arms: {a: {overrides: [algorithm.beta=0.1]}, b: {}}"))
    with pytest.raises(C.CellConfigError, match="resolve to the same config"):
        C.resolve_cells(spec, tmp_path / "st")


# ------------------------------------------------------------------------------------------ hashing
def _reference_id(overrides: list[str]) -> str:
    d = JobConfig.load(str(TINY), overrides).to_dict()
    d["checkpoint"]["resume"] = "auto"
    d["logging"].pop("dir")
    d["checkpoint"].pop("dir")
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def test_cell_id_is_a_stable_hash_of_the_resolved_config(tmp_path):
    body = "seeds: [7, 8]\narms: {a: {overrides: [algorithm.beta=0.5]}, b: {overrides: [algorithm.beta=0.25]}}"
    spec = load_spec(spec_file(tmp_path, body))
    first = C.resolve_cells(spec, tmp_path / "one")
    again = C.resolve_cells(load_spec(spec_file(tmp_path, body, "copy.yaml")), tmp_path / "two")
    assert [c.id for c in first] == [c.id for c in again]            # stable, and not tied to the directory
    assert len({c.id for c in first}) == 4                            # seed and beta both reach the id
    assert first[0].id == _reference_id(["algorithm.beta=0.5", "train.seed=7"])
    assert first[3].id == _reference_id(["algorithm.beta=0.25", "train.seed=8"])
    # the cell's run directory is inside its own directory, so the trainer's resume continues it
    assert first[0].config["logging"]["dir"] == str(tmp_path / "one" / "cells" / first[0].id / "run")
    # a default that changes the resolved config changes the id (one more key, any value)
    changed = C.resolve_cells(load_spec(spec_file(tmp_path, body.replace("0.5]", "0.5, eval.n=8]"), "c.yaml")),
                              tmp_path / "one")
    assert changed[0].id != first[0].id and changed[2].id == first[2].id   # arm b is untouched


def test_a_cell_directory_with_another_config_is_refused(tmp_path):
    spec = load_spec(spec_file(tmp_path, "arms: {a: {}}"))
    cell = C.resolve_cells(spec, tmp_path / "st")[0]
    status = C.prepare_cell_dir(cell)
    assert status.state == C.PENDING and Path(cell.config_path).exists()
    assert C.prepare_cell_dir(cell).state == C.PENDING              # same config: reused
    stored = yaml.safe_load(Path(cell.config_path).read_text())
    stored["algorithm"]["beta"] = 0.5
    Path(cell.config_path).write_text(yaml.safe_dump(stored))
    with pytest.raises(C.CellDirConflict, match=r"algorithm.beta: stored 0.5, now 0.1.*never reused"):
        C.prepare_cell_dir(cell)
    # the CLI prints it without a traceback and exits 2, before starting anything
    p = subprocess.run([sys.executable, "-m", "agro_megatron.cli.study", "run", str(tmp_path / "study.yaml"),
                        "--study-dir", str(tmp_path / "st"), "--local", "--trainer", "false"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "never reused" in p.stderr and "Traceback" not in p.stderr
    assert not list(Path(cell.dir).glob("attempt_*.log"))


def test_cell_token_names_a_file_in_the_cell_directory(tmp_path):
    spec = load_spec(spec_file(tmp_path, "overrides: [algorithm.regime=offline, algorithm.estimator=agro_off, "
                                         "algorithm.offline_data=cell:pi_ref.jsonl]"))
    cell = C.resolve_cells(spec, tmp_path / "st")[0]
    assert cell.config["algorithm"]["offline_data"] == os.path.join(cell.dir, "pi_ref.jsonl")


def test_a_local_run_refuses_multi_node_cells_before_starting(tmp_path):
    from agro_megatron.study.local import run_local

    spec = load_spec(spec_file(tmp_path, "resources: {nodes: 2}"))
    cells = C.resolve_cells(spec, tmp_path / "st")
    with pytest.raises(C.CellConfigError, match="need 2 nodes: run them with `run --slurm`"):
        run_local(spec, cells)
    assert not (tmp_path / "st").exists()


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("state, heartbeat_age, failures, expected", [
    (C.PENDING, None, 0, C.RUN),
    (C.DONE, None, 0, C.SKIP_DONE),
    (C.RUNNING, 5.0, 0, C.SKIP_RUNNING),
    (C.RUNNING, 500.0, 0, C.RUN),          # stale: requeued
    (C.RUNNING, None, 0, C.RUN),
    (C.FAILED, None, 1, C.RUN),
    (C.FAILED, None, 2, C.RUN),
    (C.FAILED, None, 3, C.SKIP_EXHAUSTED),
])
def test_next_action(state, heartbeat_age, failures, expected):
    now = 1000.0
    st = C.CellStatus(state=state, failures=failures, heartbeat=None if heartbeat_age is None else now - heartbeat_age)
    assert C.next_action(st, max_attempts=3, heartbeat_timeout_s=60.0, now=now) == expected


FAKE_TRAINER = '''
import json, os, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
run = cfg["logging"]["dir"]
os.makedirs(run, exist_ok=True)
cell_dir = os.path.dirname(run)
with open(os.path.join(cell_dir, "calls"), "a") as f:
    f.write("x\\n")
mode = open(os.environ["FAKE_MODE"]).read().strip()
if mode == "sleep":   # record two heartbeats the runner wrote while we ran
    beats = []
    for _ in range(2):
        beats.append(json.load(open(os.path.join(cell_dir, "status.json")))["heartbeat"])
        time.sleep(0.8)
    json.dump(beats, open(os.path.join(cell_dir, "beats.json"), "w"))
if mode == "fail":
    print("boom: the fake trainer failed on purpose")
    sys.exit(3)
if mode == "stop":
    sys.exit(75)
json.dump({"steps": 1}, open(os.path.join(run, "result.json"), "w"))
'''


@pytest.fixture
def fake_study(tmp_path, monkeypatch, capsys):
    """`agro-study run --local` in this process (the CLI's main), the trainer a fake subprocess."""
    from agro_megatron.cli.study import main

    trainer = write(tmp_path / "fake_trainer.py", FAKE_TRAINER)
    mode = tmp_path / "mode"
    mode.write_text("ok")
    monkeypatch.setenv("FAKE_MODE", str(mode))
    spec = spec_file(tmp_path, "max_attempts: 2\nheartbeat_timeout_s: 30\nseeds: [1, 2]\narms: {a: {}}\n")

    def run(*extra):
        rc = main(["run", str(spec), "--study-dir", str(tmp_path / "st"), "--local", "--trainer",
                   f"{sys.executable} {trainer}", *extra])
        out = capsys.readouterr()
        return subprocess.CompletedProcess([], rc, out.out, out.err)

    cells = C.resolve_cells(load_spec(spec), tmp_path / "st")
    return {"run": run, "mode": mode, "cells": cells, "spec": spec, "dir": tmp_path / "st", "capsys": capsys}


def _calls(cell) -> int:
    p = Path(cell.dir) / "calls"
    return len(p.read_text().split()) if p.exists() else 0


def test_done_cells_are_skipped_on_a_second_run(fake_study):
    p = fake_study["run"]("--parallel", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    for cell in fake_study["cells"]:
        st = C.read_status(cell.dir)
        assert (st.state, st.attempts, st.exit_code, _calls(cell)) == (C.DONE, 1, 0, 1)
        assert st.start <= st.end and st.host
    p = fake_study["run"]()
    assert p.returncode == 0 and "0 to run, 2 done" in p.stdout
    assert [_calls(c) for c in fake_study["cells"]] == [1, 1]


def test_failed_cells_are_retried_up_to_max_attempts(fake_study):
    fake_study["mode"].write_text("fail")
    for expected_failures in (1, 2):
        p = fake_study["run"]()
        assert p.returncode == 1
        for cell in fake_study["cells"]:
            st = C.read_status(cell.dir)
            assert (st.state, st.failures, st.exit_code) == (C.FAILED, expected_failures, 3)
            assert "boom: the fake trainer failed on purpose" in st.error
    p = fake_study["run"]()                       # max_attempts=2 reached: not started again
    assert "0 to run" in p.stdout and "2 failed 2x" in p.stdout
    assert [_calls(c) for c in fake_study["cells"]] == [2, 2]
    from agro_megatron.cli.study import main

    assert main(["status", str(fake_study["spec"]), "--study-dir", str(fake_study["dir"])]) == 0
    out = fake_study["capsys"].readouterr().out
    assert out.count("boom: the fake trainer failed on purpose") == 2 and "2 FAILED" in out


def test_stale_running_cells_are_requeued_and_fresh_ones_left_alone(fake_study):
    stale, fresh = fake_study["cells"]
    for cell, age in ((stale, 3600.0), (fresh, 1.0)):
        C.prepare_cell_dir(cell)
        C.write_status(cell.dir, C.CellStatus(state=C.RUNNING, attempts=1, heartbeat=time.time() - age, host="gone"))
    p = fake_study["run"]()
    assert "1 to run" in p.stdout and "1 running elsewhere" in p.stdout
    assert C.read_status(stale.dir).state == C.DONE and C.read_status(stale.dir).attempts == 2
    assert C.read_status(fresh.dir).state == C.RUNNING and _calls(fresh) == 0


def test_a_stopped_cell_is_resumable_and_not_a_failure(fake_study):
    fake_study["mode"].write_text("stop")
    fake_study["run"]()
    st = C.read_status(fake_study["cells"][0].dir)
    assert (st.state, st.exit_code, st.failures) == (C.PENDING, 75, 0)
    fake_study["mode"].write_text("ok")
    assert fake_study["run"]().returncode == 0
    st = C.read_status(fake_study["cells"][0].dir)
    assert (st.state, st.attempts) == (C.DONE, 2)


def test_the_runner_heartbeats_while_the_trainer_runs(fake_study):
    fake_study["mode"].write_text("sleep")
    p = fake_study["run"]("--heartbeat-s", "0.2")
    assert p.returncode == 0, p.stderr
    beats = json.loads((Path(fake_study["cells"][0].dir) / "beats.json").read_text())
    assert beats[1] > beats[0]


# ------------------------------------------------------------------------------------------- report
ARCHS = {"s": dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=8),
         "m": dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16),
         "l": dict(vocab_size=100, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=32)}


def planner_params(arch: dict) -> int:
    """Independent count: embeddings (vocab padded to 128) + output + per layer QKV/O/MLP/norms + final norm."""
    h, v = arch["hidden_size"], math.ceil(arch["vocab_size"] / 128) * 128
    q, kv = arch["num_heads"] * arch["head_dim"], arch["num_kv_heads"] * arch["head_dim"]
    layer = h * (q + 2 * kv) + q * h + 3 * h * arch["intermediate_size"] + 2 * h
    return 2 * v * h + arch["num_layers"] * layer + h


def make_cell(study: Path, cid: str, arm: str, seed: int, *, evals, kl, problems, arch="s", point="", state="DONE",
              length=10.0, prompt_tokens=20.0, n=4, prompts=8, finished=True):
    d = study / "cells" / cid
    run = d / "run"
    (run / "eval_problems").mkdir(parents=True)
    group = arm if not point else f"{arm}[{point}]"
    (d / "cell.json").write_text(json.dumps({"id": cid, "arm": arm, "point": point, "group": group, "seed": seed,
                                             "overrides": [], "resources": {}}))
    (d / "status.json").write_text(json.dumps({"state": state}))
    (run / "config.json").write_text(json.dumps({"train": {"prompts_per_step": prompts}, "rollout": {"n": n},
                                                 "algorithm": {"epochs_per_batch": 1}, "model": {}}))
    lines = [json.dumps({"step": 0, "eval/accuracy": evals[0][1]})]
    for step in range(1, evals[-1][0] + 1):
        lines.append(json.dumps({"step": step, "train/response_length": length, "train/kl_full_vocab": kl[step - 1]}))
        for s, a in evals:
            if s == step:
                lines.append(json.dumps({"step": s, "eval/accuracy": a}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = evals[-1][0]
    (run / "eval_problems" / f"step_{final:06d}.json").write_text(json.dumps(
        {"step": final, "n": problems[0][1], "prompt_tokens_mean": prompt_tokens,
         "problems": [{"id": pid, "n": nn, "correct": c} for pid, nn, c in problems]}))
    (run / "final_model").mkdir()
    (run / "final_model" / "agro_checkpoint.json").write_text(json.dumps({"arch": ARCHS[arch]}))
    if finished:
        (run / "result.json").write_text("{}")
    return d


def test_report_numbers_match_independent_references(tmp_path):
    study = tmp_path / "st"
    rng = np.random.default_rng(0)
    finals = {"base": [0.30, 0.36, 0.33], "arm": [0.45, 0.41, 0.50]}
    counts = {}
    for arm, fs in finals.items():
        for seed, f in zip((1, 2, 3), fs):
            steps = list(range(0, 21, 5))
            evals = [(s, 0.1 + (f - 0.1) * s / 20) for s in steps]
            evals[2] = (10, f + 0.05)                               # the peak is mid-run
            kl = list(rng.uniform(0, 1, 20))
            probs = [(f"p{i}", 16, int(rng.integers(0, 17))) for i in range(10)]
            counts[(arm, seed)] = (probs, kl)
            make_cell(study, f"{arm}{seed}", arm, seed, evals=evals, kl=kl, problems=probs, n=16)
    make_cell(study, "arm4", "arm", 4, evals=[(0, 0.1), (5, 0.9)], kl=[0.1] * 5, problems=[("p0", 16, 3)],
              state="FAILED", finished=False)
    expected = [{"id": f"{a}{s}", "group": a, "seed": s} for a in ("base", "arm") for s in (1, 2, 3)]
    expected += [{"id": "arm4", "group": "arm", "seed": 4}, {"id": "never", "group": "arm", "seed": 5}]
    rep = write_report(ReportInputs(str(study), "base", expected))
    rows = {r["group"]: r for r in rep["groups"]}
    arm = rows["arm"]
    # final accuracy: mean and Student-t interval (scipy)
    x = np.array(finals["arm"])
    half = sps.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert arm["final_accuracy"]["mean"] == pytest.approx(x.mean())
    assert (arm["final_accuracy"]["low"], arm["final_accuracy"]["high"]) == pytest.approx((x.mean() - half,
                                                                                            x.mean() + half))
    assert arm["peak_accuracy"]["mean"] == pytest.approx(x.mean() + 0.05)
    # pass@k from the per-problem counts: 1 - C(n-c, k) / C(n, k), k = 1 and the eval's n = 16
    for k in (1, 16):
        per_seed = [np.mean([1 - math.comb(n - c, k) / math.comb(n, k) for _, n, c in counts[("arm", s)][0]])
                    for s in (1, 2, 3)]
        assert arm["pass_at_k"][str(k)]["mean"] == pytest.approx(np.mean(per_seed))
    # KL at the end: the mean of the last 5 steps, averaged over seeds
    assert arm["end_kl"]["mean"] == pytest.approx(np.mean([np.mean(counts[("arm", s)][1][-5:]) for s in (1, 2, 3)]))
    # paired per-problem difference vs the baseline, over the seeds both have
    acc = {a: np.mean([[c / n for _, n, c in counts[(a, s)][0]] for s in (1, 2, 3)], axis=0) for a in finals}
    d = acc["arm"] - acc["base"]
    p = arm["paired_vs_baseline"]
    assert p["baseline"] == "base" and p["n_problems"] == 10
    assert p["mean"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(10))
    t = sps.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (p["low"], p["high"]) == pytest.approx((t.low, t.high))
    # missing: the failed cell and the one never started; only DONE cells count
    assert {(m["id"], m["state"]) for m in rep["missing"]} == {("arm4", "FAILED"), ("never", "NOT STARTED")}
    assert arm["seeds_done"] == 3 and arm["seeds_expected"] == 5
    # compute: C = 12 N T per step with N the planner's parameter count
    n_params = planner_params(ARCHS["s"])
    assert arm["params"] == n_params
    c5 = arm["compute_fit"]["curves"][0]["compute"][0]
    assert c5 == pytest.approx(5 * 12 * n_params * 8 * 16 * (20 + 10))
    out = Path(rep["out_dir"])
    with open(out / "results.csv") as f:
        table = {r["group"]: r for r in csv.DictReader(f)}
    assert float(table["arm"]["final_mean"]) == pytest.approx(x.mean()) and table["arm"]["paired_baseline"] == "base"
    md = (out / "report.md").read_text()
    assert "| arm | 3/5 |" in md and "| arm4 | arm | 4 | FAILED |" in md and "NOT STARTED" in md
    assert json.loads((out / "results.json").read_text())["cells_done"] == 6
    for png in ("accuracy_vs_step.png", "accuracy_vs_kl.png", "compute_fit.png"):
        assert (out / png).stat().st_size > 1000


def _sigmoid(c, A, B, cmid, r0):
    return r0 + (A - r0) / (1 + (cmid / c) ** B)


def test_report_compute_fit_recovers_a_known_curve_and_flags_unidentified_a(tmp_path):
    study = tmp_path / "st"
    n_params = planner_params(ARCHS["s"])
    per_step = 12 * n_params * 8 * 4 * (20 + 10)
    steps = list(range(0, 41, 2))
    r0 = 0.1
    for arm, (A, cmid_steps) in {"passes": (0.6, 10), "early": (0.6, 400)}.items():
        for seed, noise in zip((1, 2, 3), (-0.004, 0.0, 0.004)):
            evals = [(0, r0)] + [(s, _sigmoid(s * per_step, A, 2.0, cmid_steps * per_step, r0) + noise * (-1) ** s)
                                 for s in steps[1:]]
            make_cell(study, f"{arm}{seed}", arm, seed, evals=evals, kl=[0.0] * 40,
                      problems=[("p0", 4, 1), ("p1", 4, 2)])
    rep = build_report(ReportInputs(str(study)))
    rows = {r["group"]: r for r in rep["groups"]}
    fit = rows["passes"]["compute_fit"]
    assert fit["identified"] and fit["A"][0] == pytest.approx(0.6, abs=0.02)
    assert fit["C_mid"][0] == pytest.approx(10 * per_step, rel=0.1)
    assert fit["A"][1] <= fit["A"][0] <= fit["A"][2]
    assert fit["holdout"]["mean_abs_error"] < 0.05
    early = rows["early"]["compute_fit"]
    assert not early["identified"] and early["note"].startswith("A not identified")


def test_report_size_fit_holds_out_the_largest_size(tmp_path):
    study = tmp_path / "st"
    slope, intercept = 0.12, -0.3
    for size in ("s", "m", "l"):
        value = intercept + slope * math.log10(planner_params(ARCHS[size]))
        for seed in (1, 2):
            make_cell(study, f"{size}{seed}", "agro_on", seed, arch=size, point=f"size={size}",
                      evals=[(0, 0.05), (5, value)], kl=[0.0] * 5, problems=[("p0", 4, 1), ("p1", 4, 2)])
    rep = write_report(ReportInputs(str(study)))
    sf = rep["size_fits"]["agro_on"]
    assert sf["sizes"] == sorted(planner_params(a) for a in ARCHS.values())
    assert sf["fit"]["slope"] == pytest.approx(slope)
    h = sf["holdout_largest"]
    assert h["held_out_params"] == planner_params(ARCHS["l"]) and abs(h["error"]) < 1e-9
    assert (Path(rep["out_dir"]) / "size_fit.png").exists()


def test_report_with_nothing_finished_lists_everything_missing(tmp_path):
    spec = load_spec(spec_file(tmp_path, "seeds: [1, 2]\narms: {a: {}}"))
    cells = C.resolve_cells(spec, tmp_path / "st")
    C.prepare_cell_dir(cells[0])
    expected = [{"id": c.id, "group": c.request.group, "seed": c.request.seed} for c in cells]
    rep = write_report(ReportInputs(str(tmp_path / "st"), None, expected))
    assert rep["cells_done"] == 0
    assert [m["state"] for m in rep["missing"]] == ["PENDING", "NOT STARTED"]
    assert rep["groups"] == [{"group": "a", "seeds_done": 0, "seeds_expected": 2}]


def test_report_never_pools_cells_the_spec_no_longer_asks_for(tmp_path):
    """An arm's overrides changed between runs: its old cells (other ids, same group name) are still
    on disk and DONE. The report aggregates only the spec's cells, and lists the old ones."""
    study = tmp_path / "st"
    problems = [("p0", 4, 2), ("p1", 4, 3)]
    for cid, seed, acc in (("new1", 1, 0.6), ("new2", 2, 0.8)):
        make_cell(study, cid, "a", seed, evals=[(0, 0.1), (2, acc)], kl=[0.1, 0.2], problems=problems)
    make_cell(study, "old1", "a", 1, evals=[(0, 0.1), (2, 0.0)], kl=[0.1, 0.2], problems=problems)
    expected = [{"id": "new1", "group": "a", "seed": 1}, {"id": "new2", "group": "a", "seed": 2}]
    rep = write_report(ReportInputs(str(study), None, expected, plots=False))
    (row,) = rep["groups"]
    assert row["seeds_done"] == 2 and [c["id"] for c in row["per_cell"]] == ["new1", "new2"]
    assert row["final_accuracy"]["mean"] == pytest.approx(0.7)
    assert rep["not_in_spec"] == [{"id": "old1", "group": "a", "seed": 1, "state": "DONE"}]
    assert "old1" in (study / "report" / "report.md").read_text()


def test_report_draws_every_figure_when_a_group_has_no_compute_fit(tmp_path):
    """One group with enough evaluations to fit, one with too few (no fit, no line): the figures
    are still drawn, with both groups' points."""
    study = tmp_path / "st"
    problems = [("p0", 4, 2), ("p1", 4, 3)]
    for seed in (1, 2):
        make_cell(study, f"fit{seed}", "fit", seed, evals=[(0, 0.1), (2, 0.3), (4, 0.5), (6, 0.6), (8, 0.62)],
                  kl=[0.1 * k for k in range(1, 9)], problems=problems)
        make_cell(study, f"few{seed}", "few", seed, evals=[(0, 0.1), (2, 0.3)], kl=[0.1, 0.2], problems=problems)
    rep = write_report(ReportInputs(str(study), None, plots=True, workers=1))
    fits = {r["group"]: r["compute_fit"] for r in rep["groups"]}
    assert "A" in fits["fit"] and "A" not in fits["few"] and fits["few"]["note"].startswith("no fit")
    assert sorted(os.path.basename(p) for p in rep["plots"]) == [
        "accuracy_vs_kl.png", "accuracy_vs_step.png", "compute_fit.png"]
    assert all(os.path.getsize(p) > 1000 for p in rep["plots"])


# -------------------------------------------------------------------------------------------- slurm
def test_slurm_arrays_split_at_max_array_size_and_the_report_depends_on_all(tmp_path, monkeypatch):
    spec = load_spec(spec_file(tmp_path, """
        seeds: [1, 2, 3, 4, 5]
        slurm: {max_parallel: 3, extra_args: ["--account=abc"]}
        arms:
          cpu: {resources: {time_limit: "00:20:00"}}
          gpu: {overrides: [algorithm.estimator=rloo], resources: {nodes: 2, gpus_per_node: 4, time_limit: "2:00:00"}}
    """))
    cells = C.resolve_cells(spec, tmp_path / "st")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if cmd[:3] == ["scontrol", "show", "config"]:
            return subprocess.CompletedProcess(cmd, 0, "ClusterName = x\nMaxArraySize            = 2\n", "")
        if cmd[0] == "squeue":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 0, f"{100 + len(calls)};cluster\n", "")

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    plan = S.submit_study(spec, cells, str(tmp_path / "st"), workdir=str(tmp_path), python="py")
    assert S.max_array_size(fake_run) == 2
    # 5 cells per group, MaxArraySize 2 -> parts of 2, 2, 1 per group
    assert [len(p.cell_ids) for p in plan.arrays] == [2, 2, 1, 2, 2, 1]
    first, gpu = plan.arrays[0].script, plan.arrays[3].script
    assert "#SBATCH --array=0-1%3" in first and "#SBATCH --array=0-0%3" in plan.arrays[2].script
    assert f"#SBATCH --output={tmp_path / 'st' / 'slurm' / 'logs'}/%x_%A_%a.out" in first
    assert "#SBATCH --requeue" in first and "#SBATCH --signal=B:USR1@120" in first  # a tenth of 20 min
    assert "#SBATCH --account=abc" in first and "--gpus-per-node" not in first
    assert "#SBATCH --nodes=2" in gpu and "#SBATCH --gpus-per-node=4" in gpu and "#SBATCH --ntasks-per-node=4" in gpu
    assert 'scontrol requeue "$SLURM_JOB_ID"' in first and "run-cell" in first and "--launcher srun" in first
    assert Path(plan.arrays[1].cells_file).read_text().split() == [c.id for c in cells[2:4]]
    sbatch = [c for c in calls if c[0] == "sbatch"]
    array_ids = [p.job_id for p in plan.arrays]
    assert len(sbatch) == 7 and sbatch[-1][2] == f"--dependency=afterany:{':'.join(array_ids)}"
    assert sbatch[-1][-1].endswith("report.sbatch") and plan.report_job
    assert C.read_status(cells[2].dir).slurm_job == f"{plan.arrays[1].job_id}_0"
    # the scripts are valid bash
    for p in plan.arrays:
        assert subprocess.run(["bash", "-n", os.path.join(tmp_path, "st", "slurm", p.name + ".sbatch")]).returncode == 0
    # a second submission skips DONE cells and cells whose array task Slurm still holds
    C.write_status(cells[0].dir, C.CellStatus(state=C.DONE))

    def queued(cmd, **kw):
        if cmd[0] == "squeue":
            return subprocess.CompletedProcess(cmd, 0, f"{plan.arrays[0].job_id}_1\n", "")
        return fake_run(cmd, **kw)

    monkeypatch.setattr(S.subprocess, "run", queued)
    again = S.submit_study(spec, cells, str(tmp_path / "st"), workdir=str(tmp_path), python="py")
    assert again.skipped == {cells[0].id: "done", cells[1].id: "queued"}
    assert sum(len(p.cell_ids) for p in again.arrays) == 8


def test_slurm_dry_run_prints_the_scripts_and_submits_nothing(tmp_path):
    spec = spec_file(tmp_path, "seeds: [1, 2]\narms: {a: {}}")
    p = subprocess.run([sys.executable, "-m", "agro_megatron.cli.study", "run", str(spec), "--study-dir",
                        str(tmp_path / "st"), "--slurm", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --array=0-1%8" in p.stdout and "--dependency=afterany" in p.stdout
    assert "agro_megatron.cli.study report" in p.stdout
    assert not any(C.read_status(str(d)).slurm_job for d in (tmp_path / "st" / "cells").iterdir())


def test_slurm_time_parsing():
    assert [S.time_seconds(t) for t in ("30", "01:30", "2:00:00", "1-02", "1-00:00:10")] == [1800, 90, 7200, 93600,
                                                                                           86410]
    assert S.signal_lead_s("00:05:00") == 60 and S.signal_lead_s("48:00:00") == 600


# ---------------------------------------------------------------------------------------------- CLI
def test_plan_lists_cells_and_a_bad_spec_exits_2_without_traceback(tmp_path):
    spec = spec_file(tmp_path, "seeds: [1, 2]\narms: {a: {}, b: {overrides: [algorithm.estimator=rloo]}}")
    p = subprocess.run([sys.executable, "-m", "agro_megatron.cli.study", "plan", str(spec), "--study-dir",
                        str(tmp_path / "st")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "4 cells" in p.stdout and "passed the trainer's validation" in p.stdout
    bad = spec_file(tmp_path, "axes: {beta: []}", "bad.yaml")
    p = subprocess.run([sys.executable, "-m", "agro_megatron.cli.study", "plan", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "axes.beta is empty" in p.stderr and "Traceback" not in p.stderr


def test_shipped_study_specs_plan(tmp_path):
    from agro_megatron.cli.study import main

    for name in ("cpu_paper.yaml", "cpu_sizes.yaml", "llama3_8b_70b.yaml"):
        assert main(["plan", str(REPO / "examples" / "studies" / name), "--study-dir", str(tmp_path / name)]) == 0


# -------------------------------------------------------------------------------------- real trainer
@pytest.mark.slow
@pytest.mark.distributed
def test_real_two_rank_cell_records_every_problem_and_reports(tmp_path):
    """One cell on 2 gloo ranks (DP=2, torchrun): each rank evaluates half of the held-out problems;
    the per-problem record must hold all of them, and agree with the logged accuracy."""
    tiny = write(tmp_path / "tiny.yaml", f"""
        base: {TINY}
        model:
          tiny: {{hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1, head_dim: 16}}
        data: {{synthetic_train_size: 16, synthetic_heldout_size: 6}}
        rollout: {{n: 2, max_new_tokens: 6}}
        train: {{steps: 2, prompts_per_step: 2}}
        sft: {{steps: 2, batch_size: 4}}
        eval: {{every: 1, n: 3, max_problems: 6}}
        logging: {{progress: false, plots: false, tensorboard: false}}
    """)
    spec = write(tmp_path / "study.yaml", f"base: {tiny}\nresources: {{procs_per_node: 2}}\narms: {{a: {{}}}}\n")
    p = subprocess.run([sys.executable, "-m", "agro_megatron.cli.study", "run", str(spec), "--study-dir",
                        str(tmp_path / "st"), "--local"], capture_output=True, text=True, timeout=600)
    cell = C.resolve_cells(load_spec(spec), tmp_path / "st")[0]
    assert p.returncode == 0, p.stdout + p.stderr + Path(cell.dir, "attempt_1.log").read_text()[-3000:]
    assert "torch.distributed.run" in Path(cell.dir, "attempt_1.log").read_text().splitlines()[0]
    run = Path(cell.run_dir)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval/accuracy"] for m in metrics if "eval/accuracy" in m}
    assert sorted(evals) == [0, 1, 2]
    for step, acc in evals.items():
        rec = json.loads((run / "eval_problems" / f"step_{step:06d}.json").read_text())
        assert len(rec["problems"]) == 6 and all(pr["n"] == 3 for pr in rec["problems"])
        assert sum(pr["correct"] for pr in rec["problems"]) / 18 == pytest.approx(acc)  # synthetic reward is 0/1
    rep = build_report(ReportInputs(str(tmp_path / "st")))
    assert rep["cells_done"] == 1 and rep["groups"][0]["final_accuracy"]["mean"] == pytest.approx(evals[2])
