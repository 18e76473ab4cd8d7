"""Which data teaches the shipped base most: expert demonstrations where it fails, where it already succeeds, or its
own successes (what filtered BC and RECAP learn from)?

Why this exists: in the RL comparison (bench/rl_comparison.py) 100 more expert demonstrations lift the base from
0.49 to ~0.73, while 12 updates of self-improvement on ~3,500 of its own successes reach ~0.63. This separates the
two explanations: the expert's trajectories are better than the policy's own, or they are *where* the policy fails.

The probe: the base acts from its flow's mean (as filtered BC practises) on ``--layouts`` practice layouts; each is
solved or failed. From the same start, each arm then trains ``--updates`` updates of the default learner
(filtered BC with the run's settings, the 100 pretraining demonstrations replayed) on:

- ``demos alone``: nothing more (the baseline every gain is measured against, in the same run);
- ``expert on failed layouts``: ``--extra`` scripted demonstrations of layouts the base failed;
- ``expert on solved layouts``: as many of layouts the base solved;
- ``own successes``: the base's successes in its first ``--practice`` practice episodes, as the loop's first update
  would keep them (judged by the simulator here).

Each arm is evaluated on the run's 500 held-out seeds. The ratio is the gain of expert demonstrations on failed
layouts over the gain of as many on solved ones; no target, a finding: a ratio well above 1 says coverage of the
layouts it fails, not trajectory quality, is what the base lacks, and a learner that only clones its own successes
(which are on layouts it solves) is cut off from it.

    PYTHONPATH=. .venv/bin/python bench/demo_coverage.py   # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.rollout import run_episodes  # noqa: E402
from bench.common import write_result  # noqa: E402
from flywheel.config import EnvConfig, LearnerConfig  # noqa: E402
from flywheel.contracts import Label  # noqa: E402
from flywheel.update import learner_view  # noqa: E402
from flywheel.pretrain import evaluate_policy  # noqa: E402
from flywheel.parts import loop_seed, pretraining_demos  # noqa: E402
from flywheel.vla.checkpoint import load_policy_checkpoint  # noqa: E402
from flywheel.vla.model import SmallVLA, VLAPolicy  # noqa: E402
from learner.registry import make_learner  # noqa: E402

PROBE_SEEDS = 500_000  # practice layouts far from any run's first ones


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", type=int, default=600, help="practice layouts the base is probed on")
    ap.add_argument("--extra", type=int, default=100, help="expert demonstrations added in each expert arm")
    ap.add_argument("--practice", type=int, default=512, help="practice episodes the own-successes arm keeps from")
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--eval", type=int, default=500)
    args = ap.parse_args()
    vla_cfg, weights, meta = load_policy_checkpoint("base")
    env = dataclasses.asdict(EnvConfig())
    options = dataclasses.asdict(LearnerConfig())
    demos = pretraining_demos(options["demos"], meta, env)

    def base_model() -> SmallVLA:
        model = SmallVLA(vla_cfg)
        model.load_weights(weights)
        return model

    # The probe: the base from its mean, one attempt a layout, as filtered BC practises.
    practice = VLAPolicy(model=base_model())
    practice.explore, practice.sampling = True, {"indicator": 0, "guidance": 1.0, "practice_noise": 0.0}
    layouts = [loop_seed(PROBE_SEEDS + i) for i in range(args.layouts)]
    probed = run_episodes(layouts, "train", practice, policy_version=0, sample_seed=1, **env)
    solved = {ep.seed for ep in probed if ep.ground_truth["success"]}
    print(f"probe: the base solves {len(solved)} of {len(layouts)} layouts from its mean", flush=True)

    def expert_on(seeds: list[int]) -> list:
        made = run_episodes(seeds[: 2 * args.extra], "train", None, policy_version=-1, **env)
        return [ep for ep in made if ep.ground_truth["success"]][: args.extra]

    own = [learner_view(ep) for ep in probed[: args.practice]]
    for ep, raw in zip(own, probed):
        ep.labels.append(Label(source="detector", success=bool(raw.ground_truth["success"]), version="simulator"))
    arms = {
        "demos alone": ([], []),
        "expert on failed layouts": (expert_on([s for s in layouts if s not in solved]), []),
        "expert on solved layouts": (expert_on([s for s in layouts if s in solved]), []),
        "own successes": ([], own),
    }
    results = {}
    for name, (extra, episodes) in arms.items():
        torch.manual_seed(0)
        learner = make_learner("filtered_bc", base_model(), demos + extra, seed=0, **options)
        stats = learner.update(episodes)
        for _ in range(args.updates - 1):
            learner.update([])
        model = base_model()
        model.load_weights(learner.snapshot().weights)  # what the learner publishes (its moving average)
        ev = evaluate_policy(model, args.eval, env)  # the loop's held-out seeds and sampling seed
        success, ci = ev["success"], ev["ci95"]
        added = len(extra) or int(stats.get("kept_episodes", 0))
        results[name] = {"success": success, "ci95": ci, "episodes_added": added}
        print(f"{name}: +{added} episodes -> held-out success {success:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", flush=True)
    base = results["demos alone"]["success"]
    gain = {k: v["success"] - base for k, v in results.items()}
    ratio = gain["expert on failed layouts"] / gain["expert on solved layouts"] \
        if gain["expert on solved layouts"] > 0 else None
    write_result("demo_coverage", ratio, None, None, arms=results, gain_over_demos_alone=gain,
                 base_solves=len(solved) / len(layouts), updates=args.updates,
                 what="gain of expert demonstrations on layouts the base fails / gain of as many on layouts it "
                      "solves, each over the same updates on the pretraining demonstrations alone")


if __name__ == "__main__":
    main()
