"""Converted checkpoints in live megatron-core models on gloo CPU ranks (one launch of 4 ranks).

Logits of the Megatron model vs transformers' LlamaForCausalLM (fp32, relative error <= 1e-4) at
TP=1, TP=2, PP=2 and TP=2 x PP=2; GQA, llama3 RoPE scaling, tied and untied embeddings, a
vocabulary (300) that is not a multiple of 128. Resharding: checkpoints load at layouts other
than the one they were written for (TP=2 x PP=1 -> TP=1 x PP=2, and the padded vocabulary grows
384 -> 512 or shrinks 512 -> 384). The checkpoint's chunk layout equals what megatron's own
`GPTModel.sharded_state_dict()` asks for, and a dtype mismatch at load is a named error.
"""
import pickle

import pytest
import torch

from agro_megatron.checkpoint.convert import import_hf
from agro_megatron.testing import conversion_checks
from agro_megatron.testing.distributed import run_distributed
from agro_megatron.testing.tiny_llama import hf_logits, write_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def test_logits_layouts_resharding_and_megatron_layout(tmp_path):
    hf = {tie: write_tiny_llama(tmp_path / f"hf_tied{tie}", vocab_size=300, hidden=64, layers=4, heads=4,
                                kv_heads=2, tie=tie, seed=3 + tie) for tie in (False, True)}
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    refs = {str(tie): hf_logits(path, ids) for tie, path in hf.items()}
    ckpts, loads = {}, []
    for tie in (False, True):
        for tp, pp in LAYOUTS:
            label = f"tied{tie}_{tp}x{pp}"
            ckpts[label] = (str(import_hf(hf[tie], tmp_path / label, tp=tp, pp=pp)), str(tie))
            loads.append((label, tp, pp))  # at the layout it was written for
        loads += [(f"tied{tie}_2x1", 1, 2), (f"tied{tie}_1x1", 2, 2), (f"tied{tie}_2x2", 1, 1)]
    results = run_distributed(
        conversion_checks.run_all, 4, tp=1, pp=1,
        args=(ckpts, refs, ids, loads, (ckpts["tiedFalse_2x2"][0], 2, 2), (ckpts["tiedTrue_1x1"][0], 1, 1, "bf16")))

    errors = {}
    for r in results:
        errors.update(r["errors"])
    assert sorted(errors) == sorted(loads)
    worst = max(errors.values())
    assert worst <= 1e-4, {k: v for k, v in errors.items() if v > 1e-4}

    # megatron's sharded_state_dict() on the 4 ranks asks for exactly the chunks the import wrote
    wanted = {(key, off, size, shape) for r in results for key, off, size, shape in r["layout"]}
    with open(f"{ckpts['tiedFalse_2x2'][0]}/.metadata", "rb") as f:
        md = pickle.load(f).state_dict_metadata
    stored = {(key, tuple(c.offsets), tuple(c.sizes), tuple(m.size))
              for key, m in md.items() if hasattr(m, "chunks") for c in m.chunks}
    assert wanted == stored

    assert all(r["dtype_error"].startswith("DtypeMismatchError") and "dtype='fp32'" in r["dtype_error"]
               for r in results), results[0]["dtype_error"]
