import dataclasses

import numpy as np
import pytest

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from flywheel.contracts import Label, SuccessDetector
from flywheel.vla.checkpoint import load_policy_checkpoint
from reward.train import detector_examples, train_detector


class RandomPolicy:
    chunk, action_dim = 8, 3

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def act(self, images, proprio, instructions, seed=None):
        return self.rng.uniform(-1, 1, (len(images), 8, 3)).astype(np.float32)


def _labelled(eps):
    """Copies of the episodes with a ground-truth label (the shared fixtures stay unlabelled)."""
    return [dataclasses.replace(ep, labels=[Label(source="ground_truth", success=bool(ep.ground_truth["success"]))])
            for ep in eps]


def test_hard_negatives_come_from_before_success_and_from_swapped_instructions(demos):
    eps = _labelled(list(demos[:4]))
    frames, texts, ys, aux, has_aux, to_go = detector_examples(eps, np.random.default_rng(0))
    # Per success: its final frame (1), an earlier frame (0), and, where another demo of its kind names other
    # objects, its final frame under that instruction (0, with no position targets: those are the original's).
    # The progress head learns the steps still to go: 0 at the end, more before it, nothing under a swap.
    swapped = [i for i in range(len(ys)) for ep in eps
               if np.array_equal(frames[i], ep.observations["image"][-1]) and texts[i] != ep.instruction]
    assert len(ys) == 8 + len(swapped) and ys.sum() == 4 and swapped
    assert all(ys[i] == 0 and has_aux[i] == 0 and to_go[i] == -1 for i in swapped)
    assert sorted(to_go[ys == 1]) == [0] * 4
    earlier = [i for i in range(len(ys)) if ys[i] == 0 and i not in swapped]
    assert len(earlier) == 4 and all(to_go[i] > 0 for i in earlier)
    kinds = {ep.instruction: (ep.info["kind"], ep.info["named"]) for ep in eps}
    for i in swapped:
        own = next(ep for ep in eps if np.array_equal(frames[i], ep.observations["image"][-1]))
        assert kinds[texts[i]][0] == own.info["kind"] and kinds[texts[i]][1] != own.info["named"]


def test_detector_separates_successes_from_failures():
    succ = run_episodes([split_seed("train", 100 + i) for i in range(150)], "train", None, policy_version=-1)
    fail = run_episodes([split_seed("train", 300 + i) for i in range(150)], "train", RandomPolicy(), policy_version=0)
    fail = [ep for ep in fail if not ep.ground_truth["success"]]
    eps = _labelled(succ + fail)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(eps))
    held = [eps[i] for i in order[:50]]
    train = [eps[i] for i in order[50:]]
    base = load_policy_checkpoint("base")[1]  # as in a run: the encoder starts from the starting policy's
    detector, metrics = train_detector(train, held, version="detector-t", steps=400, batch_size=64, lr=1e-3,
                                       init_weights=base)
    assert isinstance(detector, SuccessDetector)
    assert metrics["auroc"] >= 0.85, metrics
    scores = detector.score(held)
    assert scores.shape == (50,) and ((scores >= 0) & (scores <= 1)).all()
    # The progress head has learned that a successful episode nears its success step by step.
    from reward.report import value_order_correlation

    rhos = [value_order_correlation(detector, ep) for ep in held if ep.ground_truth["success"]]
    assert np.mean([r for r in rhos if r is not None]) > 0.5, rhos


def test_a_window_of_frames_starts_as_the_policy_sees_the_newest_frame():
    """With three frames stacked, the layers that read pixels take the policy's weights on the newest frame's
    channels (and the coordinate planes) and zeros on the older frames': the detector starts by judging the frame the
    policy was trained on."""
    import torch

    from reward.detector import DetectorNet, DetectorNetConfig, init_from_policy, window_frames

    base = load_policy_checkpoint("base")[1]
    net = DetectorNet(DetectorNetConfig(window=3, stride=2))
    init_from_policy(net, base)
    w = net.encoder.patchify.weight.detach()
    policy_w = torch.from_numpy(np.array(base["encoder.patchify.weight"]))
    assert w.shape[1] == 9 + 2 and torch.equal(w[:, :3], policy_w[:, :3]) and torch.equal(w[:, -2:], policy_w[:, -2:])
    assert not w[:, 3:9].any()
    keys = net.encoder.keypoints.keys[0].weight.detach()
    assert torch.equal(keys[:, :3], torch.from_numpy(np.array(base["encoder.keypoints.keys.0.weight"]))[:, :3])
    ep = run_episodes([split_seed("train", 5)], "train", None, policy_version=-1)[0]
    window = window_frames(ep.observations, ("overhead",), 3, window=3, stride=2)  # steps 3, 1, 0 (clamped)
    img = ep.observations["image"]
    assert np.array_equal(window, np.concatenate([img[3], img[1], img[0]], axis=-1))


def test_dihedral_augmentation_moves_positions_with_the_image():
    import torch

    from actors.tabletop import TabletopEnv
    from reward.train import dihedral

    env = TabletopEnv()
    env.reset(seed=0)
    block = env.state()["block"]
    img = torch.from_numpy(env.render_image())[None]
    colour = torch.tensor(env.render_image()[int(block[1] * 64), int(block[0] * 64)])
    for k in range(8):
        out, pos = dihedral(img, torch.tensor([[block[0], block[1], 0.5, 0.5]], dtype=torch.float32), k)
        x, y = pos[0, 0].item(), pos[0, 1].item()
        assert torch.equal(out[0, int(y * 64), int(x * 64)], colour), k


def test_detector_judges_from_whichever_cameras_are_on():
    from flywheel.contracts import sensor_inputs
    from reward.detector import DetectorNet, DetectorNetConfig, LearnedSuccessDetector
    from reward.train import detector_examples

    sensors = ("overhead", "wrist", "depth", "touch")
    eps = run_episodes([split_seed("train", i) for i in range(3)], "train", None, policy_version=-1, sensors=sensors)
    net = DetectorNet(DetectorNetConfig(sensors=sensors))
    assert net.cfg.sensors == ("overhead", "wrist", "depth")  # no proprioception, so no touch
    frames, *_ = detector_examples(_labelled(eps), np.random.default_rng(0), cfg=net.cfg)
    assert frames.shape[-1] == 7
    scores = LearnedSuccessDetector(net, version="t").score(eps)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    image = sensor_inputs(eps[0].observations, ("overhead",))[0]  # the overhead camera alone: a view, no copy
    assert np.shares_memory(image, eps[0].observations["image"]) and image.shape == (eps[0].num_steps + 1, 64, 64, 3)


def test_detector_training_resumes_where_it_stopped(tmp_path, demos):
    """Interrupted at step 25 of 40, started again: the same detector as one trained without a stop."""
    import torch

    eps = _labelled(list(demos[:8]))
    kwargs = dict(version="d", steps=40, batch_size=8, seed=0, checkpoint_every=10)
    whole, _ = train_detector(eps, eps, checkpoint_dir=tmp_path / "a", **kwargs)

    def stop_at_25(step, steps, loss):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_detector(eps, eps, checkpoint_dir=tmp_path / "b", progress=stop_at_25, **kwargs)
    assert (tmp_path / "b" / "partial.pt").exists()
    steps_seen = []
    resumed, _ = train_detector(eps, eps, checkpoint_dir=tmp_path / "b",
                                progress=lambda step, steps, loss: steps_seen.append(step), **kwargs)
    assert steps_seen[0] == 21 and steps_seen[-1] == 40  # from the checkpoint at step 20
    assert not (tmp_path / "b").exists()  # done: the partial state is gone
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
