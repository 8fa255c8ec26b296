"""Context parallelism: the sequence layout, and CP x TP x PP against CP=1 on the trainer's own path."""
import pytest
import torch

from agro_megatron.ops.context_parallel import check_divisible, local_positions, split_sequence
from agro_megatron.testing import context_parallel_checks as checks
from agro_megatron.testing.distributed import run_distributed


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_layout_partitions_positions_and_balances_causal_work(cp):
    L = 8 * cp
    shares = [local_positions(L, cp, r) for r in range(cp)]
    assert sorted(torch.cat(shares).tolist()) == list(range(L))  # a partition of the sequence
    # causal attention work of a query at position p is p + 1 keys: every rank gets the same total
    work = {int((s + 1).sum()) for s in shares}
    assert len(work) == 1
    x = torch.arange(2 * L).view(2, L)
    assert torch.equal(split_sequence(x, 1, cp, 1), x[:, shares[1]])
    with pytest.raises(ValueError, match=f"pad to a multiple of {2 * cp}"):
        check_divisible(L + 1, cp)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cp") / "weights.pt")
    run_distributed(checks.save_weights, 1, args=(path,), tp=1)
    return path, run_distributed(checks.run_layout, 1, args=(path,), tp=1)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,cp", [(1, 1, 2), (2, 1, 2), (1, 2, 2)], ids=["cp2", "tp2xcp2", "pp2xcp2"])
def test_context_parallel_matches_cp1(reference, tp, pp, cp):
    path, ref = reference
    results = run_distributed(checks.run_layout, tp * pp * cp, args=(path, ref), tp=tp, pp=pp, cp=cp)
    for r in results:
        assert "CausalSDPAttention" in r["attention"]  # megatron's local core refuses CP
        assert r["grad_rel_err"] < 1e-5                      # DP x CP-reduced grads == CP=1 grads
    last = [r for r in results if "token_err" in r]
    assert len(last) == tp * cp
    for r in last:
        # the loss_fn really saw 1/cp of every sequence, and the stats came back whole
        assert [local * cp for local in r["seen_lengths"]] == r["full_lengths"]
        assert all(full % (2 * cp) == 0 for full in r["full_lengths"])
        assert r["kl_max"] > 1e-3  # policy and reference differ, so the KL term is exercised
        for name, err in r["token_err"].items():
            assert err < 1e-5, name
        assert r["loss_err"] < 1e-6


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_at_cp2_matches_cp1_on_the_same_offline_data(tmp_path):
    """The whole trainer (scoring, advantages, kl_pg surrogate with per-sequence means, DDP over
    DP x CP, Adam, metrics) at CP=2 follows the CP=1 run step by step on fixed responses."""
    from agro_megatron.testing import train_checks as tc

    data = str(tmp_path / "offline.jsonl")
    overrides = {"algorithm.regime": "offline", "algorithm.offline_data": data, "algorithm.estimator": "kl_pg",
                 "algorithm.logratio_reduction": "mean", "train.steps": 3, "checkpoint.save_every": 0}
    one = run_distributed(tc.run, 1, args=(str(tmp_path / "cp1"), "length_reward", overrides))[0]
    outs = run_distributed(tc.run, 2, args=(str(tmp_path / "cp2"), "length_reward",
                                            {**overrides, "parallel.cp": 2}))
    assert all(o["layout"] == {"tp": 1, "pp": 1, "cp": 2, "dp": 1} for o in outs)
    two = [o for o in outs if o["history"]]
    assert len(two) == 1  # one logging rank: CP rank 0
    steps = lambda out: [r for r in out["history"] if "train/loss" in r]  # noqa: E731
    assert len(steps(one)) == len(steps(two[0])) == 3
    for a, b in zip(steps(one), steps(two[0])):
        for key in ("train/loss", "train/grad_norm", "train/kl", "train/kl_full_vocab", "train/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert steps(one)[-1]["train/kl_full_vocab"] > 0  # the policy moved: later steps test real updates


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_at_cp2_is_bit_exact(tmp_path):
    """Checkpoints under CP (weights replicated over CP ranks) save and resume exactly."""
    from agro_megatron.testing import train_checks as tc

    cp2 = {"parallel.cp": 2}
    full = run_distributed(tc.run, 2, args=(str(tmp_path / "full"), "length_reward", cp2))
    stopped = run_distributed(tc.run, 2, args=(str(tmp_path / "split"), "sigterm_on_third_call", cp2))
    assert all(o["stopped"] and o["steps"] == 2 for o in stopped)
    resumed = run_distributed(tc.run, 2, args=(str(tmp_path / "split"), "length_reward", cp2))
    for f, r in zip(full, resumed):
        assert r["steps"] == f["steps"] == 4
        assert r["losses"] == f["losses"]
        for k, v in f["weights"].items():
            assert torch.equal(v, r["weights"][k]), k
    assert any(loss != 0.0 for _, loss in full[0]["losses"])
