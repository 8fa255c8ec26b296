"""Sample sources: where each training step's samples come from; one object per regime.

    on_policy   fresh samples from the current policy            (on_policy.py)
    replay      fresh samples, each swapped for a stored one w.p. p  (replay.py)
    stale       samples from the policy k versions behind        (stale.py)
    offline     samples generated once from pi_ref, stored        (offline.py)

They share one interface (base.SampleSource: next_batch, after_step, state_dict /
load_state_dict); `make_sample_source` (factory.py) is the one place a regime name is read.
"""
from agro_megatron.sources.factory import SOURCES, make_sample_source, source_class

REGIMES = tuple(SOURCES)

__all__ = ["REGIMES", "SOURCES", "make_sample_source", "source_class"]
