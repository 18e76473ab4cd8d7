import dataclasses

import numpy as np
import pytest

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from flywheel.contracts import Label, SuccessDetector
from flywheel.vla.checkpoint import load_policy_checkpoint
from reward.train import Training, detector_examples, train_detector


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
    detector, metrics = train_detector(train, held, version="detector-t",
                                       training=Training(steps=400, batch_size=64, lr=1e-3), init_weights=base)
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


def test_a_camera_the_policy_does_not_read_starts_at_zero_and_the_detector_judges_it():
    """detector.sensors=[overhead,wrist] on an overhead-only policy: the overhead channels of the newest frame take the
    policy's weights, the wrist channels (and the older frame's) start at zero, and the window stacks both cameras,
    frame by frame."""
    import torch

    from reward.detector import DetectorNet, DetectorNetConfig, init_from_policy, window_frames

    base = load_policy_checkpoint("base")[1]
    net = DetectorNet(DetectorNetConfig(sensors=("overhead", "wrist"), window=2, stride=2))
    init_from_policy(net, base, ("overhead",))
    w = net.encoder.patchify.weight.detach()
    policy_w = torch.from_numpy(np.array(base["encoder.patchify.weight"]))
    assert w.shape[1] == 2 * 6 + 2 and torch.equal(w[:, :3], policy_w[:, :3])
    assert torch.equal(w[:, -2:], policy_w[:, -2:]) and not w[:, 3:12].any()
    ep = run_episodes([split_seed("train", 5)], "train", None, policy_version=-1, sensors=("overhead", "wrist"))[0]
    window = window_frames(ep.observations, ("overhead", "wrist"), 2, window=2, stride=2)
    obs = ep.observations
    assert np.array_equal(window, np.concatenate([obs["image"][2], obs["wrist"][2], obs["image"][0], obs["wrist"][0]],
                                                 axis=-1))


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
    """An ensemble of two, interrupted at step 25 of its second member's 40, started again: the first member is not
    trained again, the second continues from its checkpoint, and the detector is the one trained without a stop."""
    import torch

    eps = _labelled(list(demos[:8]))
    kwargs = dict(version="d", training=Training(steps=40, batch_size=8, seed=0, checkpoint_every=10, ensemble=2))
    whole, _ = train_detector(eps, eps, checkpoint_dir=tmp_path / "a", **kwargs)

    def stop_in_the_second_member(step, steps, loss):
        if step == 40 + 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_detector(eps, eps, checkpoint_dir=tmp_path / "b", progress=stop_in_the_second_member, **kwargs)
    assert (tmp_path / "b" / "member-0" / "done.pt").exists()
    assert (tmp_path / "b" / "member-1" / "partial.pt").exists()
    steps_seen = []
    resumed, _ = train_detector(eps, eps, checkpoint_dir=tmp_path / "b",
                                progress=lambda step, steps, loss: steps_seen.append(step), **kwargs)
    assert steps_seen[0] == 40 + 21 and steps_seen[-1] == 80  # member 1, from its checkpoint at step 20
    assert not (tmp_path / "b").exists()  # done: the partial state is gone
    for a, b in zip(whole.members, resumed.members):
        a, b = a.state_dict(), b.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_ensemble_saves_loads_and_says_how_unsure_it_is(tmp_path, demos):
    """Members differ (their own seeds), the detector averages their logits, its uncertainty is their spread (none
    for a single member), and it survives a round trip through its checkpoint."""
    from flywheel.checkpoint import load_weights, save_weights
    from reward.detector import LearnedSuccessDetector

    eps = _labelled(list(demos[:8]))
    ensemble, _ = train_detector(eps, eps, version="e", training=Training(steps=20, batch_size=8, ensemble=3))
    frames = ensemble.last_frames(eps)
    each = ensemble.member_logits_frames(frames, [ep.instruction for ep in eps])
    assert each.shape == (3, 8) and not np.allclose(each[0], each[1])
    assert np.allclose(ensemble.logits(eps), each.mean(0), atol=1e-6)
    assert (ensemble.uncertainty(eps) > 0).all()
    single = LearnedSuccessDetector(ensemble.members[0], version="one")
    assert not single.uncertainty(eps).any()
    save_weights(tmp_path / "e.safetensors", ensemble.weights(), {"members": 3, "config": {}})
    loaded, missing = LearnedSuccessDetector.from_weights(*load_weights(tmp_path / "e.safetensors"))
    assert not missing and np.allclose(loaded.score(eps), ensemble.score(eps))


def test_reward_train_learns_from_older_policies_and_is_validated_on_the_newest(tmp_path, demos):
    """`flywheel reward train` (offline): every episode whose truth is known trains it, the newest policy's are held
    out, and a tenth of the older policies' episodes calibrates it. In the loop only labelled episodes count, split at
    random."""
    import json

    from flywheel.config import load_config
    from flywheel.parts import train_reward
    from flywheel.store import EpisodeStore

    store = EpisodeStore(tmp_path / "run" / "episodes")
    for ep in _labelled(list(demos[:10])):
        store.add(ep)
    for version in range(3):  # rollouts with the simulator's record only, no label
        for ep in run_episodes([split_seed("train", 50 * version + i) for i in range(10)], "train", RandomPolicy(),
                               policy_version=version):
            store.add(ep)
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'run'}", "detector.steps=4"])
    train_reward(cfg, say=lambda m: None, offline=True)
    meta = json.loads((tmp_path / "run" / "detector" / "metrics.json").read_text())
    assert meta["n"] == 10  # the newest policy's ten
    from reward.report import load_detector

    _, saved = load_detector(tmp_path / "run" / "detector" / "detector-1.safetensors")
    newest = {ep.id for ep in store.iter() if ep.policy_version == 2}
    assert set(saved["episodes"]["heldout"]) == newest
    assert len(saved["episodes"]["calibration"]) == 2 and len(saved["episodes"]["train"]) == 28  # a tenth of v0-v1
    train_reward(cfg, say=lambda m: None)  # in the loop: the ten labelled demonstrations alone
    _, saved = load_detector(tmp_path / "run" / "detector" / "detector-2.safetensors")
    assert len(saved["episodes"]["train"]) + len(saved["episodes"]["heldout"]) == 10


def test_a_detector_trained_again_from_the_stored_episodes_is_the_one_trained_when_they_were_made(tmp_path):
    """A run stopped after making its detector's episodes (and before its detector was saved), started again: the
    episodes come back from the store, in another order, and must train the very same detector."""
    from flywheel.config import load_config
    from flywheel.parts import train_reward
    from reward.report import load_detector

    run_dir = tmp_path / "run"
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "detector.steps=4", "detector.policy_episodes=20",
                              "detector.demo_episodes=10", "detector.near_miss_episodes=4", "detector.near_hit_episodes=4",
                              "detector.hover_episodes=4"])
    train_reward(cfg, say=lambda m: None)  # makes the episodes, stores them, trains
    first, meta = load_detector(run_dir / "detector" / "detector-1.safetensors")
    (run_dir / "detector" / "detector-1.safetensors").unlink()  # as if stopped before it was written
    train_reward(cfg, say=lambda m: None)  # reads them back from the store
    again, meta_again = load_detector(run_dir / "detector" / "detector-1.safetensors")
    assert meta_again["episodes"] == meta["episodes"]  # the same split, in the same order
    assert all(np.array_equal(v, again.weights()[k]) for k, v in first.weights().items())


def test_reward_train_refuses_episodes_without_the_cameras_it_is_to_judge_from(tmp_path, demos):
    """Episodes recorded with the overhead camera alone, a detector asked to judge from the wrist camera too: a
    ConfigError naming the camera and the fix, before any training, and nothing written."""
    from flywheel.config import ConfigError, load_config
    from flywheel.parts import train_reward
    from flywheel.store import EpisodeStore

    store = EpisodeStore(tmp_path / "run" / "episodes")
    for ep in _labelled(list(demos[:4])):
        store.add(ep)
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'run'}", "detector.steps=4",
                              "env.sensors=[overhead,wrist]"])
    with pytest.raises(ConfigError, match=r"lack \[wrist\].*detector.sensors=\[overhead\]"):
        train_reward(cfg, say=lambda m: None, offline=True)
    assert not (tmp_path / "run" / "detector").exists()
    assert len(list(store.iter())) == 4


def test_a_detector_below_the_auroc_floor_stops_the_run_before_the_loop(tmp_path):
    """A freshly trained detector that cannot separate success from failure (three tiny steps from scratch) stops the
    run before any practice is judged by it, saying why and what to do; what it stored stays."""
    import json

    from flywheel.config import load_config
    from flywheel.detectors import DetectorUntrusted
    from flywheel.run import run
    from flywheel.store import EpisodeStore

    run_dir = tmp_path / "run"
    cfg = load_config("run", ["experiment=tiny", "rollout.use_ray=false", "wandb.mode=disabled", f"run_dir={run_dir}",
                              "detector.steps=3", "detector.lr=1e-7", "detector.init_from_policy=false",
                              "detector.min_auroc=0.95", "detector.demo_episodes=20", "detector.policy_episodes=40",
                              "detector.near_miss_episodes=0", "detector.near_hit_episodes=0",
                              "detector.hover_episodes=0"])
    with pytest.raises(DetectorUntrusted, match=r"AUROC 0\.\d+, below the floor detector.min_auroc=0.95.*"
                                                r"detector.checkpoint=PATH.*detector.min_auroc=0"):
        run(cfg, say=lambda m: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "DetectorUntrusted" in summary["error"]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    assert not any("iteration" in json.loads(row) for row in rows)  # no practice was judged by it
    assert len(EpisodeStore(run_dir / "episodes")) > 0 and list((run_dir / "detector").glob("detector-1.safetensors"))


def test_the_shipped_detector_judges_the_shipped_base_on_seeds_no_detector_trained_on():
    """detector.checkpoint=auto's detector (flywheel/assets/base_detector.*), on the base's own episodes from the
    held-out split, recorded with both cameras as the default job records them."""
    from sklearn.metrics import roc_auc_score

    from flywheel.vla.model import VLAPolicy
    from reward.report import load_detector

    model, _ = load_policy_checkpoint("base", as_model=True)
    eps = run_episodes([split_seed("eval", 900_000 + i) for i in range(160)], "eval",
                       VLAPolicy(model=model, eval_noise=1.0), policy_version=0, sensors=("overhead", "wrist"))
    truth = np.array([bool(ep.ground_truth["success"]) for ep in eps])
    detector, meta = load_detector("base")
    assert 0.2 < truth.mean() < 0.8 and meta["env"] == {"name": "tabletop", "family": "any"}
    assert roc_auc_score(truth, detector.score(eps)) >= 0.95


def test_detector_auto_takes_the_shipped_one_only_where_it_fits_the_run():
    from flywheel.config import ConfigError, load_config
    from flywheel.detectors import _given_detector

    said = []
    detector, meta = _given_detector(load_config("run", []), said.append)
    assert detector.net.cfg.sensors == ("overhead", "wrist") and meta["heldout"]["auroc"] >= 0.95
    # the default job on one camera, or on another task family: the shipped one cannot judge it, so one is trained
    assert _given_detector(load_config("run", ["env.sensors=[overhead]"]), said.append) is None
    assert _given_detector(load_config("run", ["env.family=suite"]), said.append) is None
    assert "judges 64px frames from [overhead, wrist]" in said[0] and "env.family=any" in said[1]
    # practice in randomised scenes: the shipped one learned nominal ones
    assert _given_detector(load_config("run", ["env.randomize.lighting=0.3"]), said.append) is None
    assert "trained on nominal scenes" in said[2] and "'lighting': 0.3" in said[2]
    said.clear()
    assert _given_detector(load_config("run", ["detector.checkpoint="]), said.append) is None  # always train
    # asked for by name, a detector that does not fit is an error naming the fix
    with pytest.raises(ConfigError, match=r"detector.checkpoint=base was trained to judge env.name=tabletop "
                                          r"env.family=any.*env.family=suite.*detector.checkpoint=''"):
        _given_detector(load_config("run", ["detector.checkpoint=base", "env.family=suite"]), said.append)
    with pytest.raises(ConfigError, match=r"no shipped detector 'base:nope'.*the shipped ones: base"):
        _given_detector(load_config("run", ["detector.checkpoint=base:nope"]), said.append)
