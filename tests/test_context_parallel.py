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
        assert r["attention"] >= {"AllGatherCPAttention"}  # megatron's local core refuses CP
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
