"""What the learning tests share: episodes that move one way, judged by a detector; how far a policy moves along x;
and PPO rewarded for first moves to the right."""

import dataclasses

import numpy as np

from flywheel.contracts import Label
from flywheel.vla.model import VLAPolicy


def episodes_moving(demos, dx: float, success: bool):
    """The demos' observations with every action replaced by a constant move along x, judged by the detector."""
    out = []
    for ep in demos:
        actions = np.zeros_like(ep.actions)
        actions[:, 0] = dx
        out.append(dataclasses.replace(
            ep, id=ep.id + str(dx), actions=actions, extras={}, ground_truth=None,
            labels=[Label(source="detector", success=success, version="d", score=float(success), threshold=0.5)],
        ))
    return out


def mean_dx(model, demos, eval_noise=None) -> float:
    """The mean x of the chunks the model acts at the demos' first frames."""
    policy = VLAPolicy(model=model, eval_noise=eval_noise)
    obs = [(ep.observations["image"][0], ep.observations["proprio"][0], ep.instruction) for ep in demos]
    acts = policy.act(np.stack([o[0] for o in obs]), np.stack([o[1] for o in obs]), [o[2] for o in obs], seed=0)
    return float(acts[..., 0].mean())


def ppo_rewarding_right_first_moves(learner, worker, drawn_shape, iterations: int = 3) -> tuple[float, float]:
    """PPO for ``iterations`` updates on one-chunk episodes (the worker's ``max_steps`` 4), 4 attempts a layout, the
    detector approving those whose first move went right more than the others': (mean first x before, after) on 16
    held-out seeds, acting from the mean. ``drawn_shape``: what each episode records of its draw, checked."""
    def first_x(seeds):
        return float(np.mean([ep.actions[0, 0] for ep in worker.collect(seeds, "eval")]))

    worker.set_weights(learner.snapshot())
    before = first_x(list(range(900, 916)))
    for it in range(iterations):
        episodes = worker.collect([100 * it + i // 4 for i in range(32)], "train", sample_seed=it)
        assert episodes[0].extras["logp"].shape == drawn_shape
        for i in range(0, 32, 4):
            xs = [ep.actions[0, 0] for ep in episodes[i:i + 4]]
            for ep, x in zip(episodes[i:i + 4], xs):
                ep.labels.append(Label(source="detector", success=bool(x > np.median(xs)), version="d"))
        learner.update(episodes)
        worker.set_weights(learner.snapshot())
    return before, first_x(list(range(900, 916)))
