"""Trainer checkpoints record the model's layer spec; resuming under another spec (local <-> TE) is
refused with CheckpointSpecMismatch before anything is loaded."""
import os
import shutil

import pytest
import torch

from agro_megatron.checkpoint.manifest import MANIFEST_NAME
from agro_megatron.models.llama import layer_spec_kind
from agro_megatron.testing.distributed import run_distributed


def _snapshot(path: str) -> dict:
    return {os.path.relpath(os.path.join(d, f), path): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(path) for f in files}


def _tensors(obj, prefix="") -> dict:
    """Every tensor in a nested state dict, by path (cloned)."""
    if torch.is_tensor(obj):
        return {prefix: obj.detach().clone()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, val in items for k, v in _tensors(val, f"{prefix}/{key}").items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_then_resume(root: str) -> dict:
    """Inside one gloo rank: a 1-step run saves a checkpoint; then resume it with the kind forced to 'te'."""
    import json

    from agro_megatron.models import llama
    from agro_megatron.testing.train_checks import length_reward, tiny_config
    from agro_megatron.train import state as ckpt
    from agro_megatron.train.run import run_job

    out = {}
    trainer = run_job(tiny_config(root, **{"train.steps": 1}), reward_fn=length_reward)["trainer"]
    model, optimizer = trainer.bundle.module, trainer.bundle.optimizer
    out["running_kind"] = llama.layer_spec_kind(model)
    path = ckpt.latest_checkpoint(trainer.context.ckpt_dir)
    with open(os.path.join(path, ckpt.META_NAME)) as f:
        out["recorded"] = json.load(f)
    saved = _tensors(model.state_dict())

    def perturb():  # a load would undo this
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    perturb()
    perturbed, opt_before = _tensors(model.state_dict()), _tensors(optimizer.state_dict())
    out["optimizer_tensors"] = len(opt_before)
    files_before = _snapshot(path)

    real = llama.layer_spec_kind
    llama.layer_spec_kind = lambda m: "te/te"  # as a GPU run with TransformerEngine would see its model
    try:
        ckpt.load_trainer_checkpoint(path, model, optimizer)
        out["te"] = "loaded"
    except ckpt.CheckpointSpecMismatch as e:
        out["te"] = str(e)
    legacy = path + "_legacy"  # the same checkpoint as older code wrote it: no record, no checksums
    shutil.copytree(path, legacy)
    os.remove(os.path.join(legacy, ckpt.META_NAME))
    os.remove(os.path.join(legacy, MANIFEST_NAME))
    try:
        ckpt.load_trainer_checkpoint(legacy, model, optimizer)
        out["te_legacy"] = "loaded"
    except ckpt.CheckpointSpecMismatch as e:
        out["te_legacy"] = str(e)
    llama.layer_spec_kind = real
    out["untouched"] = (_same(perturbed, _tensors(model.state_dict()))
                        and _same(opt_before, _tensors(optimizer.state_dict())) and _snapshot(path) == files_before)

    ckpt.load_trainer_checkpoint(legacy, model, optimizer)  # no record = local: loads
    out["legacy_restored"] = _same(saved, _tensors(model.state_dict()))
    perturb()
    out["resumed"] = trainer.maybe_resume()  # same kind: resumes (the newest checkpoint)
    out["restored"] = _same(saved, _tensors(model.state_dict()))
    out["step"] = trainer.progress.step
    # the local spec with megatron's own attention core is also "local"
    out["megatron_core_kind"] = llama.layer_spec_kind(llama.build_model(trainer.context.arch, attention="megatron"))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_refuses_another_layer_spec(tmp_path):
    r = run_distributed(_save_then_resume, 1, args=(str(tmp_path),))[0]
    assert r["running_kind"] == "local/sdpa" and r["recorded"] == {
        "layer_spec": "local/sdpa", "layout": {"world_size": 1, "tp": 1, "pp": 1, "cp": 1, "dp": 1}}
    for key in ("te", "te_legacy"):
        msg = r[key]
        assert "step_000001" in msg and "'local" in msg and "'te/te'" in msg, msg
        assert "same software stack" in msg and "final_model" in msg, msg
    assert "older agro-megatron" in r["te_legacy"]
    assert r["untouched"] and r["optimizer_tensors"] > 0, "a refused resume changed model, optimizer or files"
    assert r["legacy_restored"] and r["resumed"] and r["restored"] and r["step"] == 1
    assert r["megatron_core_kind"] == "local/megatron"


def test_layer_spec_kind_sees_te_fused_norms():
    # TE (not installed here) keeps the RMSNorm weight inside linear_qkv / linear_fc1 as layer_norm_weight
    class FusedLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 4))
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(4))

    class TEDotProductAttention(torch.nn.Module):
        pass

    def model(qkv: torch.nn.Module, core: torch.nn.Module) -> torch.nn.Module:
        attn = torch.nn.Module()
        attn.linear_qkv, attn.core_attention = qkv, core
        layer = torch.nn.Module()
        layer.self_attention = attn
        root = torch.nn.Module()
        root.decoder = torch.nn.Module()
        root.decoder.layers = torch.nn.ModuleList([layer])
        return root

    assert layer_spec_kind(model(FusedLinear(), TEDotProductAttention())) == "te/te"
    assert layer_spec_kind(model(torch.nn.Linear(4, 4), torch.nn.Identity())) == "local/Identity"
    wrapped = torch.nn.Module()
    wrapped.module = model(FusedLinear(), torch.nn.Identity())  # under a DDP-like wrapper
    assert layer_spec_kind(wrapped).startswith("te/")
