"""The trainer holds no loss or regime details, reads top to bottom, and the repo stands alone.

- No estimator or regime name appears as a string anywhere under agro_megatron/train/: the
  objective (losses/objective.py) and the sample-source factory (sources/factory.py) are the
  only places that read them.
- `Trainer.run` stays under 60 lines and one training step (`Trainer.train_step`) fits a screen.
- Nothing in the repository points at design notes outside it (`../shared`, "AGRO.md").
"""
import ast
import inspect
import os
import subprocess

from agro_megatron.losses import ESTIMATORS, TOKEN_ESTIMATORS
from agro_megatron.sources import REGIMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "agro_megatron", "train")


def _string_constants(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_estimator_or_regime_name_under_train():
    names = set(ESTIMATORS) | set(TOKEN_ESTIMATORS) | set(REGIMES)
    found = []
    for name in sorted(os.listdir(TRAIN)):
        if name.endswith(".py"):
            for line, value in _string_constants(os.path.join(TRAIN, name)):
                if value in names:
                    found.append(f"train/{name}:{line}: {value!r}")
    assert not found, "\n".join(found)


def test_the_check_above_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""doc mentions agro_on."""\nif cfg.regime == "stale":\n    pass\n')
    assert [v for _, v in _string_constants(bad)] == ["stale"]


def test_trainer_reads_top_to_bottom():
    from agro_megatron.train.loop import Trainer

    run_lines = len(inspect.getsource(Trainer.run).splitlines())
    step_lines = len(inspect.getsource(Trainer.train_step).splitlines())
    assert run_lines < 60, run_lines
    assert step_lines <= 40, step_lines


def test_repository_stands_alone():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = []
    for rel in tracked:
        if rel.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".txt", ".cfg", ".toml")):
            if not os.path.exists(os.path.join(ROOT, rel)):  # deleted, not yet committed
                continue
            with open(os.path.join(ROOT, rel), errors="replace") as f:
                for i, line in enumerate(f, 1):
                    if ("../shared" in line or "AGRO.md" in line) and rel != "tests/test_trainer_structure.py":
                        offenders.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
