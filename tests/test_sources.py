"""Sample sources (agro_megatron/sources/): one object per regime behind one interface.

The stale regime is checked with a recording engine: it keeps a copy of the weights it was last
given and tags every completion with them, so each batch shows which policy version sampled it.
"""
import copy
import dataclasses

import pytest
import torch

from agro_megatron.rollout.base import Completion
from agro_megatron.sources import REGIMES, make_sample_source
from agro_megatron.sources.base import PromptStream, RolloutGenerator
from agro_megatron.sources.offline import OfflineSource
from agro_megatron.sources.on_policy import OnPolicySource
from agro_megatron.sources.replay import ReplaySource
from agro_megatron.sources.stale import StaleSource


class RecordingEngine:
    """Samples nothing real: a completion's only log-prob is the weight value it was sampled with."""

    def __init__(self, model):
        self.pushes = []
        self.update_weights(model)

    def update_weights(self, model):
        self.weights = copy.deepcopy(model.state_dict())
        self.pushes.append(float(self.weights["w"]))

    def generate(self, prompts, n, params):
        v = float(self.weights["w"])
        return [[Completion([1, 2], [v, v], "length") for _ in range(n)] for _ in prompts]

    def sleep(self):
        pass

    def wake(self):
        pass

    def close(self):
        pass


class Policy(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(value)))


@dataclasses.dataclass
class Problem:
    id: str
    answer: str


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _parts(policy, n=2, problems=6, per_step=2):
    engine = RecordingEngine(policy)
    prompts = PromptStream([Problem(f"p{i}", str(i)) for i in range(problems)], lambda p: [0, int(p.answer) + 3],
                           per_step, seed=3)
    rollouts = RolloutGenerator(engine, lambda texts, golds: [float(len(t) % 2) for t in texts], Tok(),
                                lambda seed: None, n, seed=3)
    return engine, prompts, rollouts


@dataclasses.dataclass
class Algo:
    regime: str
    staleness: int = 0
    replay_p: float = 0.5
    replay_capacity: int = 16
    offline_data: str | None = None


def _source(regime, policy, tmp_path=None, **kw):
    engine, prompts, rollouts = _parts(policy)
    algo = Algo(regime, offline_data=str(tmp_path / "off.jsonl") if tmp_path else None, **kw)

    class Bar:
        def update(self, k):
            pass

        def close(self):
            pass

    src = make_sample_source(algo, prompts=prompts, rollouts=rollouts, policy=policy,
                             build_behaviour_model=lambda: Policy(0.0),
                             progress=lambda total, desc="": Bar())
    return src, engine


@pytest.mark.parametrize("k", [1, 2])
def test_stale_snapshot_reaches_the_engine(k):
    """Step s samples from version max(0, s - k): the engine is given that snapshot, every
    completion carries it, and the batch is flagged off-policy exactly when it is behind."""
    policy = Policy(0.0)
    src, engine = _source("stale", policy, staleness=k)
    assert isinstance(src, StaleSource)
    for step in range(6):
        batch = src.next_batch(step, {})
        version = max(0, step - k)
        used = {lp for row in batch.samples for s in row for lp in s.logprobs}
        assert used == {float(version)}, (step, used)
        assert all(s.policy_version == version for row in batch.samples for s in row)
        assert bool(batch.on_policy.all()) == (version == step) and bool(batch.on_policy.any()) == (version == step)
        with torch.no_grad():  # the optimizer step: version step + 1
            policy.w.fill_(step + 1.0)
        src.after_step(policy)
        engine.update_weights(policy)  # the trainer's weight sync gives the engine the policy back
    # pushes: the start, then per step (a snapshot push when behind) + the trainer's sync
    assert engine.pushes[0] == 0.0 and engine.pushes[-1] == 6.0


def test_stale_state_round_trip_resumes_the_same_versions():
    policy = Policy(0.0)
    src, _ = _source("stale", policy, staleness=2)
    for step in range(3):
        src.next_batch(step, {})
        with torch.no_grad():
            policy.w.fill_(step + 1.0)
        src.after_step(policy)
    state = src.state_dict()
    resumed, _ = _source("stale", Policy(3.0), staleness=2)
    resumed.load_state_dict(state)
    a, b = src.next_batch(3, {}), resumed.next_batch(3, {})
    assert a.samples == b.samples and a.samples[0][0].logprobs[0] == 1.0


def test_replay_mixes_stored_samples_of_the_same_prompt_and_resumes_exactly():
    policy = Policy(0.0)
    src, _ = _source("replay", policy, replay_p=0.5)
    assert isinstance(src, ReplaySource)
    seen, replayed = set(), 0
    for step in range(4):
        batch = src.next_batch(step, {})
        for pid, row, flags in zip(batch.prompt_ids, batch.samples, batch.on_policy.tolist()):
            for s, fresh in zip(row, flags):
                if not fresh:  # a replayed sample is an earlier response to the same prompt
                    assert s.policy_version < step and (pid, s.policy_version) in seen
                    replayed += 1
                else:
                    assert s.policy_version == step
            seen.add((pid, step))
    assert replayed > 0
    state = copy.deepcopy(src.state_dict())
    resumed, _ = _source("replay", Policy(0.0), replay_p=0.5)  # the same engine weights
    resumed.load_state_dict(state)
    x, y = src.next_batch(4, {}), resumed.next_batch(4, {})
    assert x.samples == y.samples and torch.equal(x.on_policy, y.on_policy)


def test_on_policy_and_offline(tmp_path):
    policy = Policy(2.0)
    src, _ = _source("on_policy", policy)
    assert isinstance(src, OnPolicySource)
    batch = src.next_batch(0, {})
    assert batch.on_policy.all() and len(batch.samples) == 2 and len(batch.samples[0]) == 2
    off, _ = _source("offline", policy, tmp_path)  # generated once, from the starting weights
    assert isinstance(off, OfflineSource) and (tmp_path / "off.jsonl").exists()
    b0 = off.next_batch(0, {})
    assert not b0.on_policy.any() and {s.logprobs[0] for row in b0.samples for s in row} == {2.0}
    assert make_sample_source.__module__ == "agro_megatron.sources.factory" and set(REGIMES) == {
        "on_policy", "offline", "replay", "stale"}


def test_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="algorithm.regime"):
        _source("sometimes", Policy(0.0))


@pytest.mark.parametrize("problems,per_step,n,capacity,dp,steps", [
    (6, 2, 2, 16, 1, 12),     # the buffer holds every prompt: everything after epoch 1 can replay
    (40, 4, 4, 16, 1, 30),    # holds 4 prompts of 40, prompts return once an epoch: almost nothing
    (40, 4, 4, 120, 1, 30),   # holds 30 of 40
    (12, 4, 2, 100, 2, 20),   # DP=2: rank 0 sees a prompt again 1 time in 2
])
def test_replay_reach_is_the_replayed_share_at_p_1(problems, per_step, n, capacity, dp, steps):
    """replay_reach (a simulation of the prompt order and the buffer's eviction) against the real
    ReplaySource at replay_p=1, where every sample whose prompt has stored responses is swapped."""
    from agro_megatron.sources.replay import replay_reach

    engine = RecordingEngine(Policy(0.0))
    prompts = PromptStream([Problem(f"p{i}", str(i % 7)) for i in range(problems)], lambda p: [0, int(p.answer) + 3],
                           per_step, seed=5, dp_rank=0, dp_size=dp)
    rollouts = RolloutGenerator(engine, lambda texts, golds: [0.0] * len(texts), Tok(), lambda seed: None, n, seed=5)
    src = ReplaySource(OnPolicySource(prompts, rollouts), capacity=capacity, p=1.0, seed=5)
    replayed = total = 0
    for step in range(steps):
        flags = src.next_batch(step, {}).on_policy
        replayed += int((~flags).sum())
        total += flags.numel()
    assert total > 0
    assert replay_reach(problems, per_step, steps, 5, dp, n, capacity) == pytest.approx(replayed / total, abs=1e-12)


def test_replay_that_cannot_happen_is_announced_before_step_1():
    """The README demo's prompts with the default buffer: a prompt returns once an epoch (25 steps)
    while 512 samples hold a few steps' responses, so replay_p=0.9 would replay ~1%: the run says so,
    with the capacity that fixes it; with that capacity it says nothing."""
    notices = []

    def build(capacity):
        engine = RecordingEngine(Policy(0.0))
        prompts = PromptStream([Problem(f"p{i}", "1") for i in range(400)], lambda p: [0, 4], 16, seed=1234)
        rollouts = RolloutGenerator(engine, lambda t, g: [0.0] * len(t), Tok(), lambda seed: None, 8, seed=1)
        return make_sample_source(Algo("replay", replay_p=0.9, replay_capacity=capacity), prompts=prompts,
                                  rollouts=rollouts, policy=Policy(0.0), build_behaviour_model=lambda: Policy(0.0),
                                  progress=None, total_steps=60, notice=notices.append)

    build(512)
    assert len(notices) == 1 and "algorithm.replay_capacity=6400" in notices[0], notices
    assert "replay only about" in notices[0] and "not 90%" in notices[0]
    build(6400)
    assert len(notices) == 1, notices
