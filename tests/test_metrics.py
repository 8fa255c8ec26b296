"""train/metrics.py: the history, the file it keeps, and the plots' KL bookkeeping."""
import json

import pytest

from agro_megatron.train.metrics import KL, MetricsLogger, eval_vs_kl, moving_average


def test_moving_average_is_trailing():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0, 5.0])


def test_eval_points_get_the_mean_kl_of_the_steps_since_the_previous_eval():
    history = [{"step": 0, "eval/accuracy": 0.5}]
    history += [{"step": s, KL: kl, "train/reward_mean": 0.9} for s, kl in [(1, 0.1), (2, 0.3), (3, 0.5), (4, 0.9)]]
    history.insert(3, {"step": 2, "eval/accuracy": 0.6})  # logged after step 2's training record
    history.append({"step": 4, "eval/accuracy": 0.7})
    assert eval_vs_kl(history) == (pytest.approx([0.0, 0.2, 0.7]), [0.5, 0.6, 0.7])


def test_log_restore_and_plot(tmp_path):
    m = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    m.log(0, {"eval/accuracy": 0.5})
    for step in range(1, 4):
        m.log(step, {"train/reward_mean": 0.1 * step, KL: 0.01 * step, "train/grad_norm": None})
    m.log(3, {"eval/accuracy": 0.6})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == m.history and "train/grad_norm" not in lines[1]  # None is not logged
    m.restore(m.history[:2])  # a resume from step 1 rewrites the file to the checkpoint's history
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    path = m.plot(str(tmp_path / "training.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert MetricsLogger(str(tmp_path / "off"), enabled=False).plot(str(tmp_path / "x.png")) is None
