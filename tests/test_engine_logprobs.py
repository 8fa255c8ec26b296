"""`train.logprobs=engine`: log pi from the sampler instead of a second policy forward pass.

The paired pass (`recompute`) is the reference: on the same batch and weights, the engine's
log-probs must equal the trainer's recomputation to float32 rounding, the reference's must be
identical, and a whole run must train to the same weights within that rounding. Batches that are
no longer the current policy's (second epoch, replay) must fall back to the paired pass.
"""
import pytest
import torch

from agro_megatron.config import ConfigError, JobConfig
from agro_megatron.testing import logprob_checks as lc
from agro_megatron.testing.distributed import run_distributed

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("world,layout", [(1, {}), (2, {"parallel.tp": 2}), (2, {"parallel.pp": 2})],
                         ids=["tp1", "tp2", "pp2"])
def test_engine_logprobs_equal_the_paired_pass(tmp_path, world, layout):
    outs = run_distributed(lc.both_paths_on_one_batch, world, args=(str(tmp_path), dict(layout)))
    last = [o for o in outs if o["recompute"] is not None]
    assert last, "no rank returned statistics"
    for o in last:
        exact, fast = o["recompute"], o["engine"]
        assert torch.equal(exact["mask"], fast["mask"])
        assert o["tokens"] == int(exact["mask"].sum())
        m = exact["mask"].bool()
        # the reference pass is the same computation: identical
        assert torch.equal(exact["ref_logprobs"], fast["ref_logprobs"])
        # the sampler's log-probs: the same quantity, computed by another kernel path (fp32)
        diff = (exact["logprobs"] - fast["logprobs"])[m].abs().max().item()
        assert diff < 1e-4, diff
        assert exact["logprobs"][m].abs().sum() > 0
        # what the engine path trades: the full-vocabulary KL and entropy are not measured
        assert fast["kl"] is None and fast["entropy"] is None
        assert exact["kl"] is not None
        # a batch no longer from the current policy takes the paired pass again
        assert o["off_policy_engine"] is True


@pytest.mark.slow
def test_engine_logprobs_train_to_the_same_weights(tmp_path):
    common = {"train.steps": 3, "checkpoint.save_every": 0}
    exact = run_distributed(lc.final_weights, 1, args=(str(tmp_path / "a"), {**common}))[0]
    fast = run_distributed(lc.final_weights, 1, args=(str(tmp_path / "b"), {**common, "train.logprobs": "engine"}))[0]
    # Adam turns float32 rounding on near-zero gradient elements into lr-sized updates, so compare
    # whole tensors: the two runs differ by a tiny fraction of what training moved them
    start = exact["start"]
    for k, v in exact["weights"].items():
        moved = (v - start[k]).norm().item()
        assert moved > 0, k
        assert (fast["weights"][k] - v).norm().item() <= 1e-2 * moved + 1e-7, k  # measured: <= 2.6e-3
    losses = lambda h: [r["train/loss"] for r in h if "train/loss" in r]
    torch.testing.assert_close(losses(fast["history"]), losses(exact["history"]), rtol=1e-4, atol=1e-6)
    steps = [r for r in fast["history"] if "train/loss" in r]
    assert len(steps) == 3 and all("train/kl" in r and "train/kl_full_vocab" not in r for r in steps)
    assert all("train/kl_full_vocab" in r for r in exact["history"] if "train/loss" in r)


def test_engine_logprobs_refuse_a_full_vocab_kl_estimator(tmp_path):
    with pytest.raises(ConfigError, match="train.logprobs=engine.*local_kl"):
        JobConfig.load(None, [f"logging.dir={tmp_path}", "train.logprobs=engine",
                              "algorithm.token_estimator=local_kl"]).validate()
    with pytest.raises(ConfigError, match="train.logprobs"):
        JobConfig.load(None, [f"logging.dir={tmp_path}", "train.logprobs=vllm"]).validate()
