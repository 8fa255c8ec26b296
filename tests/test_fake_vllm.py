"""The vLLM stand-in (agro_megatron/testing/fake_vllm.py): each real-vLLM rule it enforces, its
log-probs against an independent float64 transformers recomputation, and the REAL
`VLLMEngine` driven against it in a 1-process gloo world (log-probs vs the Megatron model's own
log softmax, and the order of its phase changes)."""
import os
import subprocess
import sys

import pytest
import torch

from agro_megatron.testing import fake_vllm as fv

VOCAB = 300
PROMPT = [0, 17, 42, 255, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model dir (config.json + HF weights + generation_config.json) and the reference model,
    whose lm_head is scaled so next-token distributions are peaked (greedy != sampling)."""
    from agro_megatron.testing.tiny_llama import build_tiny_llama, tiny_llama_config

    out = {}
    for tie in (False, True):
        cfg = tiny_llama_config(vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, tie=tie)
        ref = build_tiny_llama(cfg, seed=1 + tie)
        with torch.no_grad():
            (ref.model.embed_tokens.weight if tie else ref.lm_head.weight).mul_(2.0 if tie else 8.0)
        d = tmp_path_factory.mktemp(f"tiny_tie{int(tie)}")
        ref.save_pretrained(d)
        out[tie] = (str(d), {k: v.clone() for k, v in ref.state_dict().items()})
    return out


@pytest.fixture
def inst(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with fv.install() as installation:
        yield installation


def _llm(model_dir, **kw):
    import vllm

    args = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=0,
                logprobs_mode="processed_logprobs")
    args.update(kw)
    return vllm.LLM(**args)


def _push(llm, state, names=None):
    items = [(n, t) for n, t in state.items() if names is None or n in names]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})


def _gen(llm, prompt=PROMPT, **sp):
    import vllm

    params = dict(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0, detokenize=False)
    params.update(sp)
    return llm.generate([{"prompt_token_ids": list(prompt)}], [vllm.SamplingParams(**params)], use_tqdm=False)[0]


def _ready(model_dir, state, **kw):
    llm = _llm(model_dir, **kw)
    _push(llm, state)
    llm.reset_prefix_cache()
    return llm


# --- installation ---------------------------------------------------------------------------------
def test_install_puts_the_stand_in_in_sys_modules_and_restores_it():
    import importlib.util

    before = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    with fv.install(platform="cpu") as inst:
        import vllm
        from vllm.distributed import parallel_state
        from vllm.platforms import current_platform

        assert vllm.STAND_IN and vllm is inst.module and parallel_state is fv.parallel_state
        assert importlib.util.find_spec("vllm") is not None  # make_engine / HAS_VLLM-style probes work
        assert not current_platform.is_sleep_mode_available() and current_platform.is_cpu()
        assert parallel_state._WORLD is None and callable(parallel_state.destroy_model_parallel)
        with pytest.raises(RuntimeError, match="already installed"):
            fv.install().start()
    after = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    assert after == before


# --- constructor ---------------------------------------------------------------------------------
def test_llm_accepts_the_engines_kwargs_and_rejects_unknown_ones(inst, tiny):
    import vllm

    d = tiny[False][0]
    # exactly what VLLMEngine passes (GPU branch included), plus its llm_kwargs of the tests
    llm = vllm.LLM(model=d, tokenizer=None, skip_tokenizer_init=True, tensor_parallel_size=1,
                   distributed_executor_backend="external_launcher", dtype="float32", load_format="dummy", seed=0,
                   max_model_len=128, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                   generation_config="vllm", enforce_eager=True, gpu_memory_utilization=0.4, enable_sleep_mode=True,
                   max_logprobs=-1)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert inst.instances == [llm.record] and inst.last is llm.record and llm.record.sleep_mode
    with pytest.raises(TypeError, match="unexpected keyword argument 'enable_sleep'"):
        vllm.LLM(model=d, enable_sleep=True)
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        vllm.LLM(model=d, load_format="dummy", skip_tokenizer_init=True, max_model_len=100_000)
    with pytest.raises(ValueError, match="logprobs_mode"):
        vllm.LLM(model=d, load_format="dummy", skip_tokenizer_init=True, logprobs_mode="processed")
    with pytest.raises(OSError, match="tokenizer"):  # no tokenizer files in the dir
        vllm.LLM(model=d, load_format="dummy")
    # SamplingParams: msgspec-style unknown field, the real checks, greedy reset, clamp
    with pytest.raises(TypeError, match="Unexpected keyword argument 'max_new_tokens'"):
        vllm.SamplingParams(max_new_tokens=4)
    for bad in (dict(temperature=-1), dict(temperature=2.5), dict(top_p=0.0), dict(max_tokens=0),
                dict(logprobs=-2), dict(top_k=-2), dict(min_tokens=5, max_tokens=2)):
        with pytest.raises(fv.VLLMValidationError):
            vllm.SamplingParams(**bad)
    sp = vllm.SamplingParams(temperature=0.0, top_p=0.5, top_k=3)
    assert (sp.top_p, sp.top_k) == (1.0, 0)
    with pytest.warns(UserWarning, match="maxed it out"):
        assert vllm.SamplingParams(temperature=1e-4).temperature == 0.01


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.environ.get("AGRO_VLLM_PYTHON", "/tmp/agro-vllm-venv/bin/python")),
                    reason="no vllm venv (bash tools/setup_vllm_cpu.sh; or set AGRO_VLLM_PYTHON)")
def test_argument_names_match_the_real_vllm():
    """The stand-in's EngineArgs / SamplingParams names are the installed vLLM's (rejecting an
    argument real vLLM takes, or accepting one it rejects, would make tests lie)."""
    py = os.environ.get("AGRO_VLLM_PYTHON", "/tmp/agro-vllm-venv/bin/python")
    code = ("import dataclasses, inspect, json, vllm\n"
            "from vllm.engine.arg_utils import EngineArgs\n"
            "p = inspect.signature(vllm.LLM.__init__).parameters\n"
            "print(json.dumps({'version': vllm.__version__,\n"
            " 'engine': sorted(f.name for f in dataclasses.fields(EngineArgs) if f.init),\n"
            " 'llm': sorted(n for n, q in p.items() if q.kind == q.KEYWORD_ONLY),\n"
            " 'sp': [n for n in vllm.SamplingParams.__struct_fields__ if not n.startswith('_')]}))\n")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=600, cwd="/tmp")
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    real = json.loads(out.stdout.strip().splitlines()[-1])
    assert real["version"].startswith(fv.VLLM_VERSION), real["version"]
    assert set(real["engine"]) == set(fv.ENGINE_ARG_NAMES)
    assert set(real["llm"]) - set(real["engine"]) == set(fv.LLM_ONLY_ARG_NAMES)
    assert set(real["sp"]) == set(fv._SP_DEFAULTS)


# --- platform and CuMem ----------------------------------------------------------------------------
def test_cpu_platform_refuses_sleep_mode(tiny, monkeypatch):
    with fv.install(platform="cpu"):
        with pytest.raises(ValueError, match="Sleep mode is not supported on current platform"):
            _llm(tiny[False][0], enable_sleep_mode=True)
        llm = _llm(tiny[False][0])
        with pytest.raises(RuntimeError, match="without enable_sleep_mode"):
            llm.sleep(1)


def test_one_cumem_instance_per_process(inst, tiny):
    d = tiny[False][0]
    first = _llm(d, enable_sleep_mode=True)
    with pytest.raises(AssertionError, match="CuMem allocator can only be used for one instance per process"):
        _llm(d, enable_sleep_mode=True)
    with pytest.raises(AssertionError, match="CuMem allocator"):
        _llm(d, enable_cumem_allocator=True)
    _llm(d)  # an engine without the CuMem pool is fine
    first.llm_engine.engine_core.shutdown()  # the executor shuts down (no process group here)
    assert inst.instances[0].shut_down and inst.instances[0].events[-1] == ("shutdown",)
    second = _llm(d, enable_sleep_mode=True)  # the pool is free again
    del second  # a collected engine frees its pool too (its armed finalizer shuts it down)
    import gc

    gc.collect()
    assert inst.last.shut_down and inst.last.llm is None
    _llm(d, enable_sleep_mode=True)


# --- sleep / wake ----------------------------------------------------------------------------------
def test_sleep_without_sleep_mode_and_level_checks(inst, tiny):
    llm = _ready(*tiny[False])
    with pytest.raises(RuntimeError, match="without enable_sleep_mode"):
        llm.sleep(2)
    llm.sleep(0)  # level 0 only pauses scheduling: legal without sleep mode
    with pytest.raises(RuntimeError, match="sleeps"):
        _gen(llm)
    assert llm.wake_up(["scheduling"]) is True
    _gen(llm)
    sleepy = _ready(*tiny[False], enable_sleep_mode=False)
    with pytest.raises(ValueError, match="level"):
        sleepy.sleep(3)
    assert [r[0] for r in llm.record.rejected] == ["sleep", "generate"]


def test_level1_offloads_and_keeps_the_weights(inst, tiny):
    llm = _ready(*tiny[False], enable_sleep_mode=True)
    before = _gen(llm).outputs[0]
    llm.sleep(1)
    assert llm.is_sleeping() and llm.record.weights_state == "offloaded"
    with pytest.raises(RuntimeError, match="sleeps"):
        _gen(llm)
    with pytest.raises(RuntimeError, match="while the weights sleep"):
        _push(llm, tiny[False][1])
    assert llm.wake_up(tags=["weights"]) is False  # the KV cache still sleeps
    with pytest.raises(RuntimeError, match="sleeps"):
        _gen(llm)
    assert llm.wake_up(tags=["kv_cache"]) is True
    again = _gen(llm).outputs[0]
    assert again.token_ids == before.token_ids and again.logprobs == before.logprobs


def test_level2_discards_the_weights_until_they_are_reloaded(inst, tiny):
    d, state = tiny[False]
    llm = _ready(d, state, enable_sleep_mode=True)
    before = _gen(llm).outputs[0]
    llm.sleep(level=2)
    assert llm.record.weights_state == "discarded" and len(llm.record.missing_weights()) == len(state)
    assert llm.wake_up() is True  # legal, but the weights are garbage now
    with pytest.raises(RuntimeError, match="garbage weights"):
        _gen(llm)
    assert all(torch.isnan(p).all() for p in llm.record._model.parameters())
    _push(llm, state)
    llm.reset_prefix_cache()
    after = _gen(llm).outputs[0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


def test_wake_order_weights_before_kv_cache(inst, tiny):
    d, state = tiny[False]
    llm = _ready(d, state, enable_sleep_mode=True)
    llm.sleep(2)
    with pytest.raises(RuntimeError, match="wake 'weights' first"):
        llm.wake_up(tags=["kv_cache"])
    with pytest.raises(ValueError, match="unknown wake_up tags"):
        llm.wake_up(tags=["weight"])
    llm.wake_up(tags=["weights"])
    _push(llm, state)
    llm.reset_prefix_cache()
    assert llm.wake_up(tags=["kv_cache"]) is True
    _gen(llm)
    assert llm.record.names() == ["reload_weights", "reset_prefix_cache", "sleep", "wake_up", "reload_weights",
                                  "reset_prefix_cache", "wake_up", "generate"]
    assert [r[0] for r in llm.record.rejected] == ["wake_up", "wake_up"]


def test_redundant_sleep_and_wake_are_ignored_as_in_vllm(inst, tiny):
    """abstract.py:382-404: sleeping while asleep and waking what is awake are no-ops (warnings);
    a wake naming one awake tag ignores the whole call."""
    d, state = tiny[False]
    llm = _ready(d, state, enable_sleep_mode=True)
    assert llm.wake_up() is True and llm.record.ignored[-1][1] == "Executor is not sleeping."
    llm.sleep(1)
    llm.sleep(2)  # ignored: the weights stay offloaded (level 1), not discarded
    assert llm.record.ignored[-1] == (("sleep", 2), "Executor is already sleeping.")
    assert llm.record.weights_state == "offloaded"
    llm.wake_up(["weights"])
    llm.wake_up(["weights", "kv_cache"])  # "weights" is awake: the whole call is ignored
    assert llm.record.sleeping_tags == {"kv_cache"} and "is not in sleeping tags" in llm.record.ignored[-1][1]
    assert llm.wake_up(["kv_cache"]) is True
    _gen(llm)  # level-1 weights survived the ignored sleep(2): no reload needed
    assert llm.record.count("sleep") == 2 and llm.record.count("wake_up") == 4


# --- weights ---------------------------------------------------------------------------------------
def test_dummy_weights_and_incomplete_pushes_cannot_generate(inst, tiny):
    d, state = tiny[False]
    llm = _llm(d)
    with pytest.raises(RuntimeError, match="dummy weights never replaced"):
        _gen(llm)
    _push(llm, state, names=[n for n in state if n != "lm_head.weight"])
    with pytest.raises(RuntimeError, match=r"1 of 21 tensors missing, e.g. \['lm_head.weight'\]"):
        _gen(llm)
    _push(llm, state, names=["lm_head.weight"])  # buckets: several calls are fine
    _gen(llm)
    assert llm.record.names() == ["reload_weights", "reload_weights", "generate"]
    assert llm.record.events[:2] == [("reload_weights", 20), ("reload_weights", 1)]


def test_a_split_fused_layer_leaves_garbage(inst, tiny):
    """layerwise.py: a qkv_proj / gate_up_proj layer that gets part of its tensors in one call is
    processed anyway; the missing shards are garbage - even when a later call brings them."""
    d, state = tiny[False]
    llm = _llm(d)
    q, k, v = (f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    _push(llm, state, names=[n for n in state if n != v])
    _push(llm, state, names=[v])
    assert llm.record.missing_weights() == sorted([q, k])
    assert len(llm.record.warnings) == 2 and "qkv_proj" in llm.record.warnings[0]
    with pytest.raises(RuntimeError, match="garbage weights"):
        _gen(llm)
    _push(llm, state, names=[q, k, v])  # the whole layer in one call repairs it
    _gen(llm)


def test_reload_rejects_unknown_names_and_shapes(inst, tiny):
    d, state = tiny[False]
    llm = _llm(d)
    with pytest.raises(ValueError, match="There is no module or parameter named 'model.layers.9.mlp.up_proj.weight'"):
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(
            [("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])})
    with pytest.raises(AssertionError, match="Attempted to load weight"):
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(
            [("model.norm.weight", torch.zeros(3))])})
    with pytest.raises(NotImplementedError, match="dummy"):
        llm.collective_rpc("reload_weights")
    with pytest.raises(AttributeError, match="no attribute 'update_weights'"):
        llm.collective_rpc("update_weights")


def test_tied_lm_head_is_the_embedding(inst, tiny):
    d, state = tiny[True]
    llm = _llm(d)
    assert len(llm.record._params) == len(state) - 1  # lm_head.weight is an alias, not a parameter
    _push(llm, state, names=[n for n in state if n != "lm_head.weight"])
    assert not llm.record.missing_weights()
    # the engine also pushes lm_head.weight for tied models: it lands in the shared tensor
    bumped = state["model.embed_tokens.weight"] + 1.0
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter([("lm_head.weight", bumped)])})
    assert torch.equal(llm.record._params["model.embed_tokens.weight"], bumped)
    _push(llm, state)
    _gen(llm)


def test_loading_a_checkpoint_from_disk(inst, tiny):
    d, state = tiny[False]
    llm = _llm(d, load_format="auto")  # weights read from the safetensors in the dir
    assert not llm.record.missing_weights() and llm.record.events == []
    ref = _ready(d, state)
    assert _gen(llm).outputs[0].logprobs == _gen(ref).outputs[0].logprobs


def test_prefix_cache_must_be_reset_after_a_push(inst, tiny):
    d, state = tiny[False]
    llm = _ready(d, state)
    _gen(llm)
    _push(llm, state)
    with pytest.raises(RuntimeError, match="without reset_prefix_cache"):
        _gen(llm)
    llm.reset_prefix_cache()
    _gen(llm)
    assert llm.record.prefix_cache_resets == 2
    no_cache = _ready(d, state, enable_prefix_caching=False)
    _gen(no_cache)
    _push(no_cache, state)
    _gen(no_cache)
    sleepy = _ready(d, state, enable_sleep_mode=True)  # a level >= 1 sleep clears the cache itself
    _gen(sleepy)
    sleepy.sleep(1)
    sleepy.wake_up(["weights"])
    _push(sleepy, state)
    sleepy.wake_up(["kv_cache"])
    _gen(sleepy)


# --- sampling --------------------------------------------------------------------------------------
def test_stops_lengths_and_logprob_dicts(inst, tiny, tmp_path):
    d, state = tiny[False]
    llm = _ready(d, state, max_model_len=12)
    greedy = _gen(llm, max_tokens=6).outputs[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 6 and greedy.stop_reason is None
    assert all(list(s) == [t] and s[t].rank == 1 for s, t in zip(greedy.logprobs, greedy.token_ids))
    k = next((i for i in range(1, 6) if greedy.token_ids[i] not in greedy.token_ids[:i]), 0)
    stopped = _gen(llm, max_tokens=6, stop_token_ids=[greedy.token_ids[k]]).outputs[0]
    assert stopped.token_ids == greedy.token_ids[:k + 1] and stopped.finish_reason == "stop"
    assert stopped.stop_reason == greedy.token_ids[k]
    held = _gen(llm, max_tokens=6, min_tokens=6, stop_token_ids=[greedy.token_ids[0]]).outputs[0]
    assert len(held.token_ids) == 6 and greedy.token_ids[0] not in held.token_ids  # masked, not just ignored
    capped = _gen(llm, max_tokens=50).outputs[0]  # prompt 5 + 7 = max_model_len 12
    assert len(capped.token_ids) == 7 and capped.finish_reason == "length"
    top = _gen(llm, max_tokens=2, logprobs=3).outputs[0]
    assert all(3 <= len(s) <= 4 for s in top.logprobs)
    with pytest.raises(fv.VLLMValidationError, match="greater than max allowed: 20"):
        _gen(llm, logprobs=-1)
    for bad_prompt, msg in (([], "cannot be empty"), ([0] * 12, "plus the number"), ([0] * 13, "longer than"),
                            ([VOCAB], "out of vocabulary")):
        with pytest.raises(fv.VLLMValidationError, match=msg):
            _gen(llm, prompt=bad_prompt)
    # generation_config="auto" adds generation_config.json's eos ids as stop ids (not with ignore_eos)
    import json
    import shutil

    d2 = tmp_path / "eos"
    shutil.copytree(d, d2)
    (d2 / "generation_config.json").write_text(json.dumps({"eos_token_id": greedy.token_ids[0]}))
    eos_llm = _ready(str(d2), state, generation_config="auto")
    out = _gen(eos_llm, ignore_eos=False).outputs[0]
    assert out.token_ids == greedy.token_ids[:1] and out.finish_reason == "stop"
    assert _gen(eos_llm, ignore_eos=True).outputs[0].token_ids == greedy.token_ids
    assert _gen(_ready(str(d2), state, generation_config="vllm"), ignore_eos=False).outputs[0].token_ids == \
        greedy.token_ids


def test_seeded_sampling_is_reproducible(inst, tiny):
    llm = _ready(*tiny[False])
    a = _gen(llm, temperature=1.0, seed=7, max_tokens=12).outputs[0]
    b = _gen(llm, temperature=1.0, seed=7, max_tokens=12).outputs[0]
    c = _gen(llm, temperature=1.0, seed=8, max_tokens=12).outputs[0]
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.token_ids != c.token_ids


def _float64_transformers(state, model_dir):
    """The independent reference model: transformers' Llama in float64, eager attention."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg._attn_implementation = "eager"
    ref = LlamaForCausalLM(cfg).double().eval()
    ref.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    return ref


def _float64_logprobs(state, model_dir, seq: list[int], start: int, temperature: float) -> torch.Tensor:
    """Independent reference: transformers' float64 forward over the whole sequence (no KV
    cache), log softmax(logits / T) of each token from position `start` on."""
    ref = _float64_transformers(state, model_dir)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([seq])).logits[0].double()
    lp = (logits[start - 1:-1] / temperature).log_softmax(-1)
    return lp.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logprobs_equal_a_float64_transformers_recomputation(inst, tiny, tie):
    d, state = tiny[tie]
    llm = _ready(d, state)
    greedy = _gen(llm, max_tokens=10).outputs[0]
    sampled = _gen(llm, temperature=0.8, seed=3, max_tokens=10).outputs[0]
    assert greedy.token_ids != sampled.token_ids  # the sample is not the greedy path
    for out, temp in ((greedy, 1.0), (sampled, 0.8)):  # processed log-probs; greedy at T = 1
        got = torch.tensor([s[t].logprob for s, t in zip(out.logprobs, out.token_ids)], dtype=torch.float64)
        ref = _float64_logprobs(state, d, PROMPT + out.token_ids, len(PROMPT), temp)
        assert float((got - ref).abs().max()) < 2e-5, (got, ref)
    # the seeded draw itself: the exponential race argmax(p / q), q ~ Exp(1) from Generator(seed)
    gen = torch.Generator().manual_seed(3)
    ref_tokens = _replay_exponential_race(state, d, PROMPT, len(sampled.token_ids), 0.8, gen)
    assert ref_tokens == sampled.token_ids
    raw = _ready(d, state, logprobs_mode="raw_logprobs")  # vLLM's default: before temperature
    out = _gen(raw, temperature=0.8, seed=3, max_tokens=10).outputs[0]
    got = torch.tensor([s[t].logprob for s, t in zip(out.logprobs, out.token_ids)], dtype=torch.float64)
    assert out.token_ids == sampled.token_ids
    assert float((got - _float64_logprobs(state, d, PROMPT + out.token_ids, len(PROMPT), 1.0)).abs().max()) < 2e-5


def _replay_exponential_race(state, model_dir, prompt, n, temperature, gen) -> list[int]:
    ref = _float64_transformers(state, model_dir)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            p = (ref(input_ids=torch.tensor([seq])).logits[0, -1] / temperature).softmax(-1)
            q = torch.empty(p.shape, dtype=torch.float32).exponential_(generator=gen).double()
            seq.append(int((p / q).argmax()))
    return seq[len(prompt):]


# --- the real VLLMEngine against the stand-in --------------------------------------------------------
def engine_lifecycle_checks() -> dict:
    """Run inside a 1-process gloo world (run_distributed): VLLMEngine at sleep level 2 (untied)
    and level 1 (tied) against the stand-in; returns what the test asserts."""
    import gc

    import torch.distributed as dist

    from agro_megatron.models.llama import build_model
    from agro_megatron.rollout import SamplingParams
    from agro_megatron.rollout import vllm_engine as ve
    from agro_megatron.testing.weight_sync_checks import _trainer_logprobs, peaked_vllm_model, perturb, vllm_arch

    prompts = [[0, 5, 9], [0, 100, 101, 102, 103, 104], [0, 250]]
    params = SamplingParams(temperature=0.7, max_new_tokens=8, seed=5)
    r: dict = {}

    def errors(model, arch, comp, temp, ps=prompts):
        seqs = [p + c.token_ids for p, g in zip(ps, comp) for c in g]
        ref = _trainer_logprobs(model, arch, seqs, temp)
        got = [torch.tensor(c.logprobs, dtype=torch.float64) for g in comp for c in g]
        starts = [len(p) - 1 for p in ps for _ in comp[0]]
        return max(float((x - y[s:]).abs().max()) for x, y, s in zip(got, ref, starts))

    with fv.install() as inst:
        import vllm
        from vllm.distributed import parallel_state as vps

        for tie, level in ((False, 2), (True, 1)):
            out: dict = {}
            arch, model = peaked_vllm_model(tie)
            # bucket = the largest weight: about one weight per reload_weights call
            engine = ve.VLLMEngine(model, arch=arch, sleep_level=level, max_model_len=128, bucket_bytes=262144,
                                   llm_kwargs={"enable_sleep_mode": True})
            rec = inst.last
            out["sleep_level"] = engine._sleep.level
            out["finalizer_disarmed"] = not engine.llm.llm_engine.engine_core._finalizer.alive
            out["startup_events"] = rec.names()
            comp = engine.generate(prompts, 2, params)
            out["gen_err"] = errors(model, arch, comp, 0.7)
            greedy = engine.generate([prompts[0]], 1, SamplingParams(temperature=0.0, max_new_tokens=6))
            out["greedy_err"] = errors(model, arch, greedy, 1.0, [prompts[0]])
            try:  # a second sleep-mode engine while this one lives: real vLLM's CuMem assertion
                ve.VLLMEngine(model, arch=arch, sleep_level=level, max_model_len=128,
                              llm_kwargs={"enable_sleep_mode": True})
                out["second_engine"] = "built"
            except AssertionError as e:
                out["second_engine"] = str(e)
            engine.sleep()
            engine.sleep()  # the engine's own guard: no second llm.sleep
            try:
                engine.generate(prompts, 1, params)
                out["generate_asleep"] = "sampled"
            except RuntimeError as e:
                out["generate_asleep"] = str(e)
            try:  # bypassing the engine's guard, the stand-in refuses too
                engine.llm.generate([{"prompt_token_ids": prompts[0]}], vllm.SamplingParams(max_tokens=2))
                out["llm_generate_asleep"] = "sampled"
            except RuntimeError as e:
                out["llm_generate_asleep"] = str(e)
            if level == 1:  # level 1 may wake without new weights and sample as before
                engine.wake()
                out["wake_same"] = [[c.token_ids for c in g] for g in engine.generate(prompts, 2, params)] == \
                    [[c.token_ids for c in g] for g in comp]
                engine.sleep()
            mark = len(rec.events)
            perturb(model, arch, scale=0.2)
            engine.update_weights(model)
            out["update_events"] = rec.names()[mark:]
            comp2 = engine.generate(prompts, 2, params)
            out["gen_err_after"] = errors(model, arch, comp2, 0.7)
            out["changed"] = any(  # the new weights are used
                a.token_ids != b.token_ids or max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) > 1e-3
                for g1, g2 in zip(comp, comp2) for a, b in zip(g1, g2))
            out["warnings"], out["ignored"] = list(rec.warnings), list(rec.ignored)
            out["rejected"] = [name for name, _ in rec.rejected]
            out["resets"], out["reloads"] = rec.prefix_cache_resets, rec.count("reload_weights")
            engine.close()
            out["after_close"] = dict(shut_down=rec.shut_down, last_event=rec.events[-1],
                                      pg_alive=dist.is_initialized(),
                                      world_released=vps._WORLD is None and vps._TP is None)
            del engine
            gc.collect()
            r[f"level{level}_tie{int(tie)}"] = out

        # negative controls: lifecycle bugs the stand-in turns into failures
        arch = vllm_arch(False)
        torch.manual_seed(0)
        model = build_model(arch, dtype="fp32").eval()
        engine = ve.VLLMEngine(model, arch=arch, sleep_level=2, max_model_len=128,
                               llm_kwargs={"enable_sleep_mode": True})
        engine.sleep()
        try:  # the KV cache woken before the weights
            engine.llm.wake_up(tags=["kv_cache"])
            r["wrong_order"] = "accepted"
        except RuntimeError as e:
            r["wrong_order"] = str(e)
        engine.close()
        # never sleeps, so nothing else clears the prefix cache
        engine = ve.VLLMEngine(model, arch=arch, sleep_level=0, max_model_len=128)
        engine.llm.reset_prefix_cache = lambda *a, **k: True  # an update_weights that forgets the reset
        engine.generate(prompts, 1, params)
        engine.update_weights(model)
        try:
            engine.generate(prompts, 1, params)
            r["no_reset"] = "sampled"
        except RuntimeError as e:
            r["no_reset"] = str(e)
        r["sleep0_events"] = inst.last.names()
        engine.close()
        del engine
        gc.collect()

        # the finalizer the engine disarms: left armed, collecting the LLM destroys the DEFAULT group
        import json
        import tempfile

        d = tempfile.mkdtemp(prefix="fake_vllm_test_")
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(vllm_arch(False).to_hf_config(), f)
        llm = vllm.LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="float32",
                       distributed_executor_backend="external_launcher")
        r["groups_built"] = vps._WORLD is not None and vps._TP is not None
        del llm
        gc.collect()
        r["pg_alive_after_armed_finalizer"] = dist.is_initialized()
    return r


@pytest.mark.slow
@pytest.mark.distributed
def test_real_vllm_engine_against_the_stand_in():
    from agro_megatron.testing.distributed import run_distributed

    (r,) = run_distributed(engine_lifecycle_checks, 1, tp=1, pp=1, timeout_s=900)
    buckets = r["level2_tie0"]["startup_events"].count("reload_weights")
    assert buckets > 3, r  # several buckets, none splitting a fused layer (no warnings below)
    for key, out in ((k, v) for k, v in r.items() if k.startswith("level")):
        level = out["sleep_level"]
        print(key, {k: v for k, v in out.items() if "err" in k})
        assert out["finalizer_disarmed"], out
        n = out["startup_events"].count("reload_weights")
        assert out["startup_events"] == ["reload_weights"] * n + ["reset_prefix_cache"], out
        assert out["gen_err"] < 1e-4 and out["greedy_err"] < 1e-4 and out["gen_err_after"] < 1e-4, out
        assert out["second_engine"] == fv.CUMEM_MESSAGE, out
        assert "asleep" in out["generate_asleep"] and "sleeps" in out["llm_generate_asleep"], out
        # the one safe order: weights, the new weights, reset the prefix cache, then the KV cache
        assert out["update_events"] == ["wake_up"] + ["reload_weights"] * n + ["reset_prefix_cache", "wake_up"], out
        assert out["changed"] and not out["warnings"] and not out["ignored"], out
        assert out["rejected"] == ["generate"], out  # only the bypass above
        assert out["after_close"] == dict(shut_down=True, last_event=("shutdown",), pg_alive=True,
                                          world_released=True), out
        if level == 1:
            assert out["wake_same"], out
    assert r["level2_tie0"]["sleep_level"] == 2 and r["level1_tie1"]["sleep_level"] == 1
    assert r["groups_built"] and r["pg_alive_after_armed_finalizer"] is False, r
    assert "wake 'weights' first" in r["wrong_order"], r
    assert "without reset_prefix_cache" in r["no_reset"], r
    assert "sleep" not in r["sleep0_events"] and "wake_up" not in r["sleep0_events"], r
