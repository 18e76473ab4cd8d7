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
            return model.flow_loss(fixed["images"], fixed["ids"], fixed["proprio"], fixed["actions"]).item()

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
