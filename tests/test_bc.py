import numpy as np
import torch

from flywheel.vla.model import SmallVLA
from learner.bc import BCTrainer, ChunkDataset, action_chunks


def test_action_chunks_pad_past_the_end():
    actions = np.array([[1, 0, 1], [0, 1, -1]], np.float32)
    chunks = action_chunks(actions, 3)
    assert chunks.shape == (2, 3, 3)
    assert np.array_equal(chunks[0, :2], actions)
    assert np.array_equal(chunks[1, 1], [0, 0, -1])  # stay still, gripper as it was


def test_bc_loss_goes_down(demos):
    torch.manual_seed(0)
    model = SmallVLA()
    data = ChunkDataset(model)
    data.add(demos, pinned=True)
    trainer = BCTrainer(model, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    fixed = data.sample(128, torch.Generator().manual_seed(1))

    def held_loss():
        torch.manual_seed(2)
        with torch.no_grad():
            return model.action_loss(fixed["images"], fixed["ids"], fixed["proprio"], fixed["actions"]).item()

    before = held_loss()
    for _ in range(120):
        trainer.step(data.sample(32, gen))
    after = held_loss()
    assert after < 0.7 * before, (before, after)


def test_dataset_keeps_pinned_demos_when_full(demos):
    model = SmallVLA()
    data = ChunkDataset(model, max_episodes=10)
    data.add(demos[:5], pinned=True)
    data.add(demos[5:20])
    assert data.num_episodes == 10
    assert sum(e.pinned for e in data._eps) == 5


def test_a_corrected_episode_counts_once_against_the_bound_and_leaves_whole(demos):
    """An episode a person finished is two entries (the policy's steps, the person's): it counts as one episode
    against ``max_episodes``, and when it is the oldest, both entries leave together."""
    import dataclasses

    from flywheel.contracts import INTERVENTION

    corrected = [dataclasses.replace(ep, extras={INTERVENTION: np.arange(ep.num_steps) >= 8}) for ep in demos[:4]]
    data = ChunkDataset(SmallVLA(), max_episodes=3)
    for ep in corrected:
        data.add([ep])
        data.add_corrections([ep])
    assert data.num_episodes == 3 and len(data._eps) == 6
    assert {e.episode for e in data._eps} == {ep.id for ep in corrected[1:]}
    assert data.keys() == {k for ep in corrected[1:] for k in (ep.id, f"{ep.id}/corrections")}


def test_a_vla_reading_every_sensor_learns_and_acts():
    # Wrist camera, depth and touch on: the policy reads them all (stacked image channels, touch with proprio),
    # behaviour cloning lowers its loss, and it acts on what a rollout gives it.
    from actors.rollout import run_episodes
    from actors.tabletop import split_seed
    from flywheel.vla.model import VLAConfig, VLAPolicy

    sensors = ("overhead", "wrist", "depth", "touch")
    demos = run_episodes([split_seed("train", i) for i in range(12)], "train", None, policy_version=-1,
                         sensors=sensors)
    torch.manual_seed(0)
    model = SmallVLA(VLAConfig(sensors=sensors))
    assert model.encoder.patchify.in_channels == 3 + 3 + 1 + 2  # + the two coordinate planes
    data = ChunkDataset(model)
    data.add(demos, pinned=True)
    fixed = data.sample(64, torch.Generator().manual_seed(1))
    assert fixed["images"].shape[-1] == 7 and fixed["proprio"].shape[-1] == 4

    def held_loss():
        torch.manual_seed(2)
        with torch.no_grad():
            return model.action_loss(fixed["images"], fixed["ids"], fixed["proprio"], fixed["actions"]).item()

    before = held_loss()
    trainer, gen = BCTrainer(model, lr=1e-3), torch.Generator().manual_seed(0)
    for _ in range(60):
        trainer.step(data.sample(32, gen))
    assert held_loss() < 0.8 * before
    eps = run_episodes([split_seed("eval", 0), split_seed("eval", 1)], "eval", VLAPolicy(model=model),
                       policy_version=0, sensors=sensors, max_steps=8)
    assert all(e.num_steps > 0 for e in eps)
    with np.testing.assert_raises_regex(KeyError, "turn them on with env.sensors"):
        run_episodes([split_seed("eval", 0)], "eval", VLAPolicy(model=model), policy_version=0, max_steps=4)


def test_augmented_images_are_the_same_picture_shifted_and_relit():
    import torch

    from learner.bc import augment_images

    frames = torch.zeros((64, 16, 16, 3), dtype=torch.uint8)
    frames[:, 8, 8] = 200  # one lit pixel on a dark table
    out = augment_images(frames, torch.Generator().manual_seed(0), pad=2, brightness=0.2)
    lit = [torch.nonzero(o.sum(-1)) for o in out]
    assert all(len(p) == 1 and (p[0] - 8).abs().max() <= 2 for p in lit)  # moved by at most the pad, never lost
    assert len({tuple(p[0].tolist()) for p in lit}) > 5  # and to many places
    level = torch.stack([o.max() for o in out]).float()
    assert 160 <= level.min() < level.max() <= 240  # relit within 1 +- 0.2
