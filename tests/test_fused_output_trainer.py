"""`train.fused_output`: the trainer's log-prob passes and losses from hidden states, whole runs.

The logits path (`train.fused_output=false`, the exact path every other trainer test runs) is
the reference: the same short run with the fused output op must log the same loss every step
and end at the same weights, to float32 rounding, while the statistics and losses were really
computed by `fused_output_logprobs` (its calls are counted; the logits op is never called) and
no hidden-states hook is left on the policy afterwards (the native sampler shares it: a hook left on
would sample from hidden states and the runs would part ways at step 2).

Covered: an estimator whose loss reads the reference's logits (kl_pg: the policy+reference pair
through the schedule, KL in the loss) and one without (agro_on), at TP=1, TP=2 (vocab-sharded
output weight, d hidden summed over TP), PP=2 (only the last stage has an output layer) and CP=2
(positions split; kl_pg); the SFT stage; `train.logprobs=engine` (reference-only pass) with it.
Two launches: one rank, and two ranks that run the TP=2, PP=2 and CP=2 jobs one after another.
"""
import pytest
import torch

from agro_megatron.testing import fused_trainer_checks as fc
from agro_megatron.testing.distributed import run_distributed

STEPS = 3
COMMON = {"train.steps": STEPS, "checkpoint.save_every": 0, "eval.n": 1, "eval.max_problems": 2,
          "logging.tensorboard": False}
# fp32 runs: the two paths sum the same logits in a different order, so the losses agree to
# float32 rounding (observed <= 3e-7 absolute at |loss| ~ 0.1, ~1e-7 relative at |loss| ~ 100).
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
# Weights: Adam divides each gradient element by its own running RMS, so an element whose gradient
# is ~0 (a sum of cancelling terms) turns rounding into an update of lr size; element-wise
# tolerances would measure that, not the fused op. Per parameter tensor, the two runs' final
# weights must differ by a small fraction of how far training moved that tensor:
# ||w_fused - w_logits|| <= WEIGHT_REL ||w_logits - w_start||. Observed: <= 2.5e-4 (the SFT case,
# lr 3e-3); a gradient path missing or wrong (e.g. d hidden not summed over TP) gives O(0.1-1).
WEIGHT_REL = 2e-3

ONE_RANK = {
    "kl_pg": {"algorithm.estimator": "kl_pg"},
    "agro_on": {"algorithm.estimator": "agro_on"},
    "engine_logprobs": {"algorithm.estimator": "agro_on", "train.logprobs": "engine"},
    "sft": {"algorithm.estimator": "agro_on", "sft.steps": 3, "sft.batch_size": 4, "train.steps": 1},
}
TWO_RANKS = {
    "tp2_kl_pg": {"algorithm.estimator": "kl_pg", "parallel.tp": 2},
    "tp2_agro_on": {"algorithm.estimator": "agro_on", "parallel.tp": 2},
    "pp2_kl_pg": {"algorithm.estimator": "kl_pg", "parallel.pp": 2},
    "pp2_agro_on": {"algorithm.estimator": "agro_on", "parallel.pp": 2},
    "cp2_kl_pg": {"algorithm.estimator": "kl_pg", "parallel.cp": 2},
}


def _both_paths(cases: dict) -> dict:
    return {f"{name}:{fused}": {**COMMON, **o, "train.fused_output": fused}
            for name, o in cases.items() for fused in (False, True)}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_1")
    return run_distributed(fc.run_observed, 1, args=(str(root), _both_paths(ONE_RANK)))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_2")
    return run_distributed(fc.run_observed, 2, args=(str(root), _both_paths(TWO_RANKS)))


def _check_same_run(ranks: list, name: str, steps: int) -> None:
    """Per rank: the logits run and the fused run of `name` agree; the fused op did the work."""
    logged, worst = 0, 0.0
    for r, out in enumerate(ranks):
        exact, fused = out[f"{name}:False"], out[f"{name}:True"]
        assert "error" not in exact and "error" not in fused, (r, exact.get("error"), fused.get("error"))
        assert exact["steps"] == fused["steps"] == steps
        # which op computed the statistics and losses: every call on the fused run is the fused op
        assert exact["calls"]["fused"] == 0 and fused["calls"]["logits"] == 0, (r, exact["calls"], fused["calls"])
        assert fused["calls"]["fused"] == exact["calls"]["logits"], (r, exact["calls"], fused["calls"])
        assert fused["logits_after"] and exact["logits_after"], r
        if exact["losses"]:
            logged += 1
            assert [s for s, _ in fused["losses"]] == [s for s, _ in exact["losses"]] == list(range(1, steps + 1))
            torch.testing.assert_close(torch.tensor([v for _, v in fused["losses"]], dtype=torch.float64),
                                       torch.tensor([v for _, v in exact["losses"]], dtype=torch.float64), **LOSS_TOL)
        assert sorted(fused["weights"]) == sorted(exact["weights"]) == sorted(exact["start_weights"])
        for k, w in exact["weights"].items():
            update = float((w - exact["start_weights"][k]).norm())
            apart = float((fused["weights"][k] - w).norm())
            assert update > 0, (name, r, k)  # training moved every parameter tensor
            assert apart <= WEIGHT_REL * update, (name, r, k, apart, update)
            worst = max(worst, apart / update)
    assert logged == 1  # one logging rank
    print(f"{name}: max over tensors of ||w_fused - w_logits|| / ||w_logits - w_start|| = {worst:.2e}")


@pytest.mark.parametrize("name", ["kl_pg", "agro_on", "engine_logprobs"])
@pytest.mark.distributed
@pytest.mark.slow
def test_fused_run_equals_logits_run_tp1(one_rank, name):
    _check_same_run(one_rank, name, STEPS)
    assert one_rank[0][f"{name}:True"]["calls"]["fused"] > 0


@pytest.mark.distributed
@pytest.mark.slow
def test_fused_sft_equals_logits_sft(one_rank):
    _check_same_run(one_rank, "sft", 1)
    exact, fused = one_rank[0]["sft:False"], one_rank[0]["sft:True"]
    assert len(exact["sft_losses"]) == len(fused["sft_losses"]) == 3
    torch.testing.assert_close(torch.tensor(fused["sft_losses"], dtype=torch.float64),
                               torch.tensor(exact["sft_losses"], dtype=torch.float64), **LOSS_TOL)
    assert exact["sft_losses"][0] != exact["sft_losses"][-1]  # SFT trained


@pytest.mark.parametrize("name", sorted(TWO_RANKS))
@pytest.mark.distributed
@pytest.mark.slow
def test_fused_run_equals_logits_run_two_ranks(two_ranks, name):
    _check_same_run(two_ranks, name, STEPS)
    if name.startswith("pp2"):  # only the last stage has an output layer: the first never calls an op
        assert two_ranks[0][f"{name}:True"]["calls"] == {"logits": 0, "fused": 0}
        assert two_ranks[1][f"{name}:True"]["calls"]["fused"] > 0
    else:
        assert all(out[f"{name}:True"]["calls"]["fused"] > 0 for out in two_ranks)


def test_output_logprobs_dispatches_on_the_kind_of_output():
    """One call for the loss code: HiddenStates go to the fused op, logits to the logits op, and
    the two give the same statistics (float64, against logits formed explicitly); a mixed pair is
    refused by name."""
    from agro_megatron.ops import HiddenStates, output_logprobs

    g = torch.Generator().manual_seed(0)
    hid, ref_hid = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    w, ref_w = (torch.randn(13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, -1] = -100
    fused = output_logprobs(HiddenStates(hid, w), labels, HiddenStates(ref_hid, ref_w), temperature=0.7, vocab_size=11)
    plain = output_logprobs(hid @ w.t(), labels, ref_hid @ ref_w.t(), temperature=0.7, vocab_size=11)
    # float64 reference: log_softmax over the 11 real columns (the last 2 rows are TP padding)
    logp = torch.log_softmax((hid @ w[:11].t()) / 0.7, -1)
    logq = torch.log_softmax((ref_hid @ ref_w[:11].t()) / 0.7, -1)
    valid = labels != -100
    want_lp = torch.where(valid, logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    want_kl = torch.where(valid, (logp.exp() * (logp - logq)).sum(-1), 0.0)
    want_h = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    for st in (fused, plain):
        torch.testing.assert_close(st.logprobs, want_lp, rtol=0, atol=1e-12)
        torch.testing.assert_close(st.kl, want_kl, rtol=0, atol=1e-12)
        torch.testing.assert_close(st.entropy, want_h, rtol=0, atol=1e-12)
    assert HiddenStates(hid, w).device == hid.device
    with pytest.raises(TypeError, match="ref_output is Tensor"):
        output_logprobs(HiddenStates(hid, w), labels, ref_hid @ ref_w.t())
    with pytest.raises(TypeError, match="ref_output is HiddenStates"):
        output_logprobs(hid @ w.t(), labels, HiddenStates(ref_hid, ref_w))
    with pytest.raises(TypeError, match="logits tensor or HiddenStates"):
        output_logprobs((hid, w), labels)
