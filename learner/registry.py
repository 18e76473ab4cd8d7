"""Learning algorithms by config name (``learner.algorithm``)."""

import inspect

from learner.filtered_bc import FilteredBCLearner
from learner.imitation import ImitationLearner
from learner.ppo import PPOLearner
from learner.recap import RecapLearner
from learner.residual_ppo import ResidualPPOLearner

ALGORITHMS = {"filtered_bc": FilteredBCLearner, "imitation": ImitationLearner, "ppo": PPOLearner,
              "recap": RecapLearner, "residual_ppo": ResidualPPOLearner}


def accepted_options(cls) -> set[str]:
    """The keyword options a learner class takes, its base classes' included."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY}
    return names


def make_learner(name: str, model, demos, /, **options):
    """Build the learner ``name``; of ``options`` (the whole ``learner`` config, say) it takes the ones it
    declares, so that one algorithm's settings never reach another."""
    if name not in ALGORITHMS:
        raise ValueError(f"learner.algorithm={name!r} is unknown: choose one of {sorted(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    taken = accepted_options(cls)
    return cls(model, demos, **{k: v for k, v in options.items() if k in taken})
