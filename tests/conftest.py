"""Shared pytest fixtures."""
import pytest


@pytest.fixture(scope="module")
def generous_reward_timeout():
    """A 60 s reward time limit for the module: a loaded CI machine must not turn a slow
    legitimate SymPy check into a timeout (0.0) in tests that assert verdicts, not speed."""
    from agro_megatron.rewards import configure

    old = configure()["timeout_s"]
    configure(timeout_s=60.0)
    yield
    configure(timeout_s=old)
