"""Building a learner by its name (``learner.algorithm``: a registered one, flywheel/plugins.py, or an import path
``module:factory``), with the options its factory declares."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from flywheel import plugins


def accepted_options(factory: Callable[..., Any]) -> set[str]:
    """The keyword options a learner factory takes (a class: its base classes' too)."""
    if not isinstance(factory, type):
        params = inspect.signature(factory).parameters.values()
        return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    names: set[str] = set()
    for klass in factory.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY}
    options = getattr(factory, "Options", None)  # a class whose keys are a dataclass's fields, taken as **options
    return names | ({f.name for f in dataclasses.fields(options)} if options is not None else set())


def make_learner(algorithm: str | Callable[..., Any], model, demos, /, strict: bool = False, **options):
    """Build the learner ``algorithm`` (a name, or its factory). Of ``options`` it takes the ones it declares; with
    ``strict``, one it does not declare is a ValueError naming those it does (a run's config)."""
    factory = plugins.resolve("learner", algorithm) if isinstance(algorithm, str) else algorithm
    taken = accepted_options(factory)
    if strict and not _takes_any(factory) and set(options) - taken:
        raise ValueError(f"learner.algorithm={getattr(factory, '__name__', factory)} takes no "
                         f"{sorted(set(options) - taken)}: it takes {sorted(taken - {'version', 'seed'})}")
    return factory(model, demos, **(options if _takes_any(factory) else
                                    {k: v for k, v in options.items() if k in taken}))


def _takes_any(factory: Callable[..., Any]) -> bool:
    if getattr(factory, "Options", None) is not None:  # its **options are exactly the Options' fields
        return False
    init = factory.__init__ if isinstance(factory, type) else factory
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values())
