"""Learning algorithms by config name (``learner.algorithm``)."""

from learner.filtered_bc import FilteredBCLearner
from learner.recap import RecapLearner

ALGORITHMS = {"filtered_bc": FilteredBCLearner, "recap": RecapLearner}


def make_learner(name: str, model, demos, **kwargs):
    if name not in ALGORITHMS:
        raise ValueError(f"learner.algorithm={name!r} is unknown: choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](model, demos, **kwargs)
