"""checkpoint/mapping.py against layouts written out head by head (an independent construction)."""
import pytest
import torch

from agro_megatron.checkpoint import mapping
from agro_megatron.checkpoint.mapping import Weight
from agro_megatron.models.llama import LlamaArch, padded_vocab_size

ARCH = LlamaArch(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=8,
                 num_kv_heads=4, head_dim=4)


def _hf(arch, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in mapping.hf_shapes(arch, w).items()}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_shard_is_megatron_group_interleave(tp):
    """Rank r holds, for each of its query groups g: the q rows of g's heads, then k_g, then v_g."""
    w = Weight("qkv", 1)
    hf = _hf(ARCH, w)
    q, k, v = (hf[n] for n in w.hf_names)
    d, per_group, groups = ARCH.head_dim, ARCH.heads_per_group, ARCH.num_kv_heads
    full = mapping.hf_to_megatron(ARCH, w, hf)
    shards = []
    for r in range(tp):
        rows = []
        for g in range(r * groups // tp, (r + 1) * groups // tp):
            for h in range(g * per_group, (g + 1) * per_group):
                rows.append(q[h * d:(h + 1) * d])
            rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        expected = torch.cat(rows)
        shards.append(mapping.shard(ARCH, w, full, tp, r))
        assert torch.equal(shards[-1], expected)
    assert torch.equal(mapping.unshard(ARCH, w, shards), full)
    back = mapping.megatron_to_hf(ARCH, w, full)
    assert all(torch.equal(back[n], hf[n]) for n in w.hf_names)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fc1_shard_is_gate_then_up_slice(tp):
    w = Weight("fc1", 0)
    hf = _hf(ARCH, w)
    gate, up = (hf[n] for n in w.hf_names)
    n = ARCH.intermediate_size // tp
    full = mapping.hf_to_megatron(ARCH, w, hf)
    assert torch.equal(full, torch.cat([gate, up]))
    shards = [mapping.shard(ARCH, w, full, tp, r) for r in range(tp)]
    for r, s in enumerate(shards):
        assert torch.equal(s, torch.cat([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]]))
    assert torch.equal(mapping.unshard(ARCH, w, shards), full)


@pytest.mark.parametrize("kind", ["embedding", "output"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_padding_and_rows(kind, tp):
    w = Weight(kind)
    hf = _hf(ARCH, w)
    (name,) = w.hf_names
    vp = padded_vocab_size(ARCH.vocab_size, tp)
    assert vp % (128 * tp) == 0 and vp >= ARCH.vocab_size
    full = mapping.hf_to_megatron(ARCH, w, hf, tp=tp)
    assert full.shape == (vp, ARCH.hidden_size)
    assert torch.equal(full[:ARCH.vocab_size], hf[name]) and not full[ARCH.vocab_size:].any()
    for r in range(tp):
        assert torch.equal(mapping.shard(ARCH, w, full, tp, r), full[r * vp // tp:(r + 1) * vp // tp])
    # a full tensor padded for another TP is re-padded when sharded
    other = mapping.hf_to_megatron(ARCH, w, hf, tp=1)
    assert torch.equal(mapping.shard(ARCH, w, other, tp, tp - 1), full[(tp - 1) * vp // tp:])
    assert torch.equal(mapping.megatron_to_hf(ARCH, w, full)[name], hf[name])


@pytest.mark.parametrize("kind", ["proj", "fc2"])
def test_row_parallel_splits_columns(kind):
    w = Weight(kind, 0)
    hf = _hf(ARCH, w)
    (name,) = w.hf_names
    full = mapping.hf_to_megatron(ARCH, w, hf)
    cols = full.shape[1] // 2
    assert torch.equal(mapping.shard(ARCH, w, full, 2, 1), hf[name][:, cols:])
    assert torch.equal(mapping.unshard(ARCH, w, [mapping.shard(ARCH, w, full, 2, r) for r in range(2)]), full)


def test_every_weight_round_trips_and_names_parse():
    arch = LlamaArch(**{**ARCH.__dict__, "tie_word_embeddings": False})
    ws = mapping.weights(arch)
    assert len(ws) == 2 + 6 * arch.num_layers + 1
    hf_names = list(mapping.iter_hf_names(arch))
    assert len(hf_names) == len(set(hf_names)) == 3 + 9 * arch.num_layers
    for w in ws:
        hf = _hf(arch, w)
        for tp in (1, 2):
            full = mapping.hf_to_megatron(arch, w, hf, tp=tp)
            shards = [mapping.shard(arch, w, full, tp, r) for r in range(tp)]
            back = mapping.megatron_to_hf(arch, w, mapping.unshard(arch, w, shards))
            assert back.keys() == hf.keys() and all(torch.equal(back[n], hf[n]) for n in hf)
        for te in (False, True):
            name = w.megatron_name(te=te)
            assert mapping.parse_megatron_name(name) == w
            assert mapping.parse_megatron_name("module." + name) == w
    assert Weight("output") not in mapping.weights(ARCH.__class__(**{**ARCH.__dict__, "tie_word_embeddings": True}))


def test_names_of_a_pipeline_stage_and_non_weights():
    w = Weight("input_norm", 5)
    assert w.megatron_name(layer_offset=4) == "decoder.layers.1.input_layernorm.weight"
    assert w.megatron_name(te=True, layer_offset=4) == "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert mapping.parse_megatron_name("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", layer_offset=4) == \
        Weight("mlp_norm", 5)
    assert w.ckpt_key == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    for name in ("decoder.layers.0.self_attention.linear_qkv._extra_state", "rotary_pos_emb.inv_freq"):
        assert mapping.parse_megatron_name(name) is None


def test_tp_must_split_whole_groups():
    with pytest.raises(ValueError, match="query groups"):
        mapping.tp_pieces(ARCH, Weight("qkv", 0), 8, 0)
