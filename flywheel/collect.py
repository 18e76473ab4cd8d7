"""The collect phase: an iteration's practice episodes, from the actors or from the store.

Two collectors wired from the same parts, as the loop asks for them: ``Collector`` collects each iteration's share
when the loop gets to it (tests, debugging, in-process workers); ``PipelinedCollector`` starts the next share on the
actors while the loop labels and learns from this one, so the actors practise one version behind instead of waiting
(``rollout.overlap``). Both adopt the attempts a crashed run had stored, so none is lost and none run twice.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flywheel.contracts import CollectsAsync, Episode, ReportsUsage, Rollouts
from flywheel.state import Budget, LoopState

ROUND_EPISODES = 16  # a round beyond the iteration's: one actor's batch, where a batched policy call has most of
#                      its gain (bench batched_inference), and short enough that the learner seldom waits for it


@dataclasses.dataclass
class Practice:
    """One iteration's practice: ``episodes`` (adopted from the store first, then ``new``, which are not yet
    stored), ``beyond`` episodes of it practised past the iteration's share, and the actors' busy share of the
    time since the last collection (None where the rollouts do not report usage)."""

    episodes: list[Episode]
    new: list[Episode]
    beyond: int = 0
    busy: float | None = None


@dataclasses.dataclass
class Pace:
    """How long an iteration and an evaluation take, so the budget keeps time for the final evaluation."""

    budget: Budget
    iteration_s: float = 0.0
    eval_s: float = 0.0

    def allows(self, state: LoopState, ahead: int = 0, episodes_ahead: int = 0) -> bool:
        """Whether the iteration ``ahead`` of the next one still fits (0: the next)."""
        return self.budget.allows(state.iteration + ahead, state.env_steps, (1 + ahead) * self.iteration_s,
                                  reserve_s=self.eval_s * 1.2 + 2.0, episodes=state.episodes + episodes_ahead)


class Collector:
    """Each iteration's ``group_size`` attempts at each of its layouts, collected when the loop asks.

    ``in_flight``: episodes of the next iteration stored before a crash (a resumed run), spanning
    ``in_flight_layouts`` seed indices (more than an iteration's when it had practice beyond it); only the attempts
    they lack are collected."""

    def __init__(self, rollouts: Rollouts, seed_of: Callable[[int], int], episodes_per_iteration: int,
                 group_size: int = 1, in_flight: list[Episode] = (), in_flight_layouts: int = 0):
        self.rollouts, self.seed_of, self.group_size = rollouts, seed_of, group_size
        self.layouts = max(1, episodes_per_iteration // group_size)
        self.in_flight, self.in_flight_layouts = list(in_flight), in_flight_layouts
        self.usage = self._usage()  # the actors' busy time so far: each iteration reports its share of the interval

    def seeds(self, first: int, layouts: int) -> list[int]:
        """The seeds of ``layouts`` layouts from seed index ``first``, each ``group_size`` times."""
        return [self.seed_of(first + i // self.group_size) for i in range(layouts * self.group_size)]

    def collect(self, state: LoopState) -> Practice:
        taken = max(self.layouts, self.in_flight_layouts if self.in_flight else 0)
        adopted, seeds = adopt(self.in_flight, self.seeds(state.next_train_index, taken))
        self.in_flight = []
        new = self.rollouts.collect(seeds, "train", sample_seed=state.next_train_index) if seeds else []
        state.next_train_index += taken
        return self._practice(adopted, new, taken)

    def look_ahead(self, state: LoopState, pace: Pace, collected: int) -> None:
        """Serial: the next iteration is collected when it comes."""

    def finish(self) -> list[Episode]:
        """What was collected ahead when the budget ran out (to be stored, for a resumed run to learn from)."""
        return []

    def _practice(self, adopted: list[Episode], new: list[Episode], taken: int) -> Practice:
        busy, self.usage = busy_fraction(self.usage, self._usage())  # the actors are idle now: answered at once
        return Practice(adopted + new, new, (taken - self.layouts) * self.group_size, busy)

    def _usage(self) -> list[dict[str, float]] | None:
        return self.rollouts.usage() if isinstance(self.rollouts, ReportsUsage) else None


class PipelinedCollector(Collector):
    """The next iteration's share is started on the actors as soon as this one's is in, before it is stored,
    labelled or learned from; a new snapshot and the gate's evaluation queue behind it. Actors done with that share
    before the learner's update ends go on practising with the same weights (``MorePractice``), up to
    ``keep_collecting`` times an iteration's episodes more, and the next iteration learns from all of it."""

    def __init__(self, rollouts: Rollouts, seed_of: Callable[[int], int], episodes_per_iteration: int,
                 group_size: int = 1, in_flight: list[Episode] = (), in_flight_layouts: int = 0,
                 keep_collecting: float = 0.0):
        if not isinstance(rollouts, CollectsAsync):
            raise TypeError(f"{type(rollouts).__name__} cannot collect asynchronously (CollectsAsync): use the "
                            f"serial Collector")
        super().__init__(rollouts, seed_of, episodes_per_iteration, group_size, in_flight, in_flight_layouts)
        self.keep_collecting = keep_collecting
        self.pending: Callable[[], list[Episode]] | None = None
        self.more: MorePractice | None = None

    def collect(self, state: LoopState) -> Practice:
        if self.pending is None:
            return super().collect(state)
        new, self.pending = self.pending(), None  # started last iteration, on these very seeds and rounds beyond
        taken = self.layouts + (self.more.drawn if self.more else 0)
        state.next_train_index += taken
        return self._practice([], new, taken)

    def look_ahead(self, state: LoopState, pace: Pace, collected: int) -> None:
        if not pace.allows(state, ahead=1, episodes_ahead=collected):
            return
        ahead = self.seeds(state.next_train_index, self.layouts)
        self.more = self._more_practice(pace.budget, state, collected)
        self.pending = self.rollouts.collect_async(ahead, "train", sample_seed=state.next_train_index,
                                                   **({"more": self.more} if self.more else {}))

    def finish(self) -> list[Episode]:
        return self.pending() if self.pending is not None else []

    def _more_practice(self, budget: Budget, state: LoopState, collected: int) -> "MorePractice | None":
        """The rounds the actors may go on with after the next iteration's share: ``keep_collecting``
        iterations' worth at most, and none past the budget's episodes."""
        limit = int(self.keep_collecting * self.layouts)
        if budget.max_episodes:
            left = budget.max_episodes - state.episodes - collected - self.layouts * self.group_size
            limit = min(limit, max(0, left) // self.group_size)
        round_layouts = max(1, -(-ROUND_EPISODES // self.group_size))
        if limit < round_layouts:
            return None
        return MorePractice(self.seed_of, state.next_train_index + self.layouts, self.group_size, limit,
                            round_layouts)


@dataclasses.dataclass
class MorePractice:
    """Rounds of practice beyond an iteration's episodes (``CollectsAsync.collect_async(more=)``). Their seed
    indices follow the iteration's, a round of whole layouts at a time; ``drawn`` counts the layouts handed out,
    all of which come back (or are recorded lost), so the seed index moves on by them and no seed is used twice."""

    seed_of: Callable[[int], int]
    first: int  # the seed index of the first layout beyond the iteration's
    group_size: int
    limit: int  # layouts at most
    round_layouts: int = 1
    drawn: int = 0

    def __iter__(self) -> "MorePractice":
        return self

    def __next__(self) -> tuple[list[int], int]:
        if self.drawn + self.round_layouts > self.limit:
            raise StopIteration
        start = self.first + self.drawn
        self.drawn += self.round_layouts
        return [self.seed_of(start + i // self.group_size) for i in range(self.round_layouts * self.group_size)], start


def adopt(stored: list[Episode], seeds: list[int]) -> tuple[list[Episode], list[int]]:
    """Of the attempts ``seeds`` asks for (a seed once per attempt), those already in ``stored``, and the seeds
    still to run. An attempt stored before a crash is used, never run again: none lost, none twice."""
    wanted: dict[int, int] = {}
    for s in seeds:
        wanted[s] = wanted.get(s, 0) + 1
    adopted = []
    for ep in stored:
        if wanted.get(ep.seed, 0) > 0:
            wanted[ep.seed] -= 1
            adopted.append(ep)
    rest = [s for s, n in wanted.items() for _ in range(n)]
    return adopted, rest


def busy_fraction(before: list[dict] | None, now: list[dict] | None) -> tuple[float | None, list[dict] | None]:
    """The actors' busy seconds over their alive seconds between two readings (a replaced worker counts from its
    start) -> (fraction, ``now`` for the next interval)."""
    if not before or not now or len(before) != len(now):
        return None, now
    busy = alive = 0.0
    for b, n in zip(before, now):
        fresh = n["alive_s"] < b["alive_s"]  # a new actor in that place
        busy += n["busy_s"] - (0.0 if fresh else b["busy_s"])
        alive += n["alive_s"] - (0.0 if fresh else b["alive_s"])
    return (busy / alive if alive > 0 else None), now
