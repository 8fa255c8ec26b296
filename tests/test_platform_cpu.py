"""megatron-core on CPU/gloo: TP=2 and PP=2 logits and gradients equal TP=1 (fp32 and bf16)."""
import pytest

from agro_megatron.testing import platform_checks as checks
from agro_megatron.testing.distributed import run_distributed

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("platform") / "ref.pt")
    run_distributed(checks.reference, 1, args=(path,), tp=1, pp=1)
    return path


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_layout_matches_tp1(reference, tp, pp):
    results = run_distributed(checks.compare_layout, tp * pp, args=(reference,), tp=tp, pp=pp)
    last = results[-1]
    # fp32: summation order differs between layouts only
    assert last["fp32"]["logit_err"] < 1e-5
    assert last["fp32"]["loss_err"] < 1e-6
    for rank_result in results:
        assert rank_result["fp32"]["grad_rel_err"] < 1e-4
        # bf16: one bf16 ulp near the largest value is 2**-8 relative
        assert rank_result["bf16"]["grad_rel_err"] < 0.05
    assert last["bf16"]["logit_err"] < 0.05
    assert last["bf16"]["loss_err"] < 0.02



def test_checkpoint_results_queue_hands_back_what_was_put():
    """Shim 6: megatron's synchronous save puts the writers' results on its queue and reads them
    back at once with get_nowait. A multiprocessing.Queue loses that race (its put returns before
    a feeder thread has written the item): agro-train failed with 'results_queue should not be
    empty' at the 7th save of the demo."""
    assert run_distributed(checks.checkpoint_results_queue_round_trips, 1, args=(20,), tp=1, pp=1)[0] == 20
