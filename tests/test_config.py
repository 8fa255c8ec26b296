"""Job configuration: YAML + dotted overrides, `base:` includes, validation messages."""
import pytest

from agro_megatron.config import ConfigError, JobConfig
from agro_megatron.losses import ESTIMATORS


def load(*overrides, path=None):
    return JobConfig.load(path, list(overrides))


def test_defaults_are_the_tiny_cpu_demo_and_overrides_apply():
    c = load("train.steps=3", "optim.lr=1e-3", "rollout.temperature=0.7", "model.tiny={hidden_size: 32}")
    assert c.train.steps == 3 and c.optim.lr == pytest.approx(1e-3) and isinstance(c.optim.lr, float)
    assert c.rollout.temperature == 0.7 and c.model.tiny == {"hidden_size": 32}
    assert c.rollout.engine == "native" and c.parallel.tp == 1


@pytest.mark.parametrize("overrides,world,fragment", [
    (["train.stepz=3"], None, "did you mean train.steps"),
    (["rollout.n=1"], None, "rollout.n >= 2"),
    (["algorithm.beta=0"], None, "needs beta > 0"),
    (["algorithm.estimator=ppo"], None, "choose one of agro_on"),
    (["train.steps=abc"], None, "expected int"),
    (["parallel.tp=2"], 3, "!= world size 3"),
    (["train.prompts_per_step=3"], 2, "not divisible by DP=2"),
    (["model.megatron_checkpoint=/nonexistent/ckpt"], None, "does not exist"),
    (["algorithm.regime=offline"], None, "needs algorithm.offline_data"),
    (["algorithm.token_estimator=causal", "algorithm.regime=replay"], None, "only valid on on-policy"),
    (["optim.lr=fast"], None, "expected a number"),
    (["train"], None, "is not key=value"),
    (["parallel.cp=2", "parallel.tp=2"], 2, "TP x PP x CP = 2x1x2 needs 4 processes .* world size is 2; "
                                            "launch a multiple of 4 processes"),
])
def test_bad_configs_name_the_key_and_the_fix(overrides, world, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load(*overrides).validate(world_size=world)


def test_pg_allows_beta_zero_and_world_size_sets_dp():
    load("algorithm.estimator=pg", "algorithm.beta=0").validate(world_size=1)
    load("parallel.tp=2", "train.prompts_per_step=8").validate(world_size=8)  # DP = 4
    load("parallel.cp=2", "parallel.tp=2", "train.prompts_per_step=2").validate(world_size=8)  # DP = 2


def test_base_include_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 7, prompts_per_step: 4}\nalgorithm: {beta: 0.2}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 9}\n")
    c = load("algorithm.beta=0.3", path=str(tmp_path / "child.yaml"))
    assert (c.train.steps, c.train.prompts_per_step, c.algorithm.beta) == (9, 4, 0.3)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load(path=str(tmp_path / "loop.yaml"))


def test_shipped_configs_load():
    import glob

    paths = sorted(glob.glob("examples/*.yaml") + glob.glob("examples/paper/*.yaml"))
    assert len(paths) >= 8
    for p in paths:
        c = JobConfig.load(p)
        assert c.rollout.n >= 2, p


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_config_and_losses_agree_on_beta(estimator, beta):
    """A config validates exactly when the losses accept its (estimator, beta) (kl_pg: beta=0 too)."""
    import torch

    from agro_megatron.losses import sequence_advantages

    x = torch.zeros(2, 3)
    try:
        sequence_advantages(estimator, x, x, x, beta)
        losses_accept = True
    except ValueError:
        losses_accept = False
    try:
        load(f"algorithm.estimator={estimator}", f"algorithm.beta={beta}").validate()
        config_accepts = True
    except ConfigError as err:
        assert "beta" in str(err)
        config_accepts = False
    assert config_accepts == losses_accept
    needs_positive = {"agro_on": True, "agro_off": True, "rloo": True, "kl_pg": False, "pg": False}
    assert losses_accept == (beta > 0 or not needs_positive[estimator])


def test_config_choices_are_the_implementations_lists():
    from agro_megatron.losses import LOGRATIO_REDUCTIONS, TOKEN_ESTIMATORS
    from agro_megatron.rollout import ENGINE_KINDS
    from agro_megatron.sources import REGIMES

    for key, valid in (("algorithm.estimator", ESTIMATORS), ("algorithm.token_estimator", TOKEN_ESTIMATORS),
                       ("algorithm.logratio_reduction", LOGRATIO_REDUCTIONS), ("algorithm.regime", REGIMES),
                       ("rollout.engine", ENGINE_KINDS)):
        with pytest.raises(ConfigError, match=f"{key}='nope' is not valid; choose one of {', '.join(valid)}$"):
            load(f"{key}=nope").validate()
