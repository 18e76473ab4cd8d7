"""``flywheel pretrain``: behaviour cloning of the small VLA on a limited set of scripted demonstrations.

Resumable: started again with the same ``out_dir`` it continues from the newest good checkpoint (weights,
optimizer, step and sampler state), so an interrupted hour is not lost. At the end it writes
``out_dir/base_vla.safetensors`` and ``out_dir/base_vla.json`` (the command, seed and metrics that made it), and with
``export=PATH`` copies both there (the repository ships one at flywheel/assets/).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from actors.rollout import make_env, run_episodes
from actors.tabletop import split_seed
from flywheel.checkpoint import CheckpointDir
from flywheel.config import ConfigError, to_dict
from flywheel.metrics import wilson_interval
from flywheel.store import EpisodeStore, atomic_write_bytes
from flywheel.vla.checkpoint import save_policy
from flywheel.vla.model import ACTION_HEADS, SmallVLA, VLAConfig, VLAPolicy
from learner.bc import BCTrainer, ChunkDataset, warmup_cosine


def evaluate_policy(model: SmallVLA, n: int, env_kwargs: dict) -> dict[str, Any]:
    seeds = [split_seed("eval", i) for i in range(n)]
    eps = run_episodes(seeds, "eval", VLAPolicy(model=model), policy_version=0, sample_seed=12345, **env_kwargs)
    ok = np.array([ep.ground_truth["success"] for ep in eps])
    per_task = {t: float(np.mean([o for o, ep in zip(ok, eps) if ep.task == t])) for t in sorted({e.task for e in eps})}
    return {"success": float(ok.mean()), "ci95": list(wilson_interval(int(ok.sum()), len(ok))), "episodes": len(ok),
            "per_task": per_task}


def vla_config_for(env_kwargs: dict, **shape) -> VLAConfig:
    """A VLA shaped for the environment: its image size, every sensor that is on, its action and proprio widths
    (3 and 3 on the built-in tabletop, 4 and 4 through the Meta-World and Fetch adapters)."""
    probe = make_env(**{k: v for k, v in env_kwargs.items() if k != "execute"})  # execute is the rollout's
    try:
        action_dim = int(probe.action_space.shape[0])
        proprio_dim = int(probe.observation_space["proprio"].shape[0])
    finally:
        getattr(probe, "release", probe.close)()
    return VLAConfig(image_size=env_kwargs["image_size"], sensors=tuple(env_kwargs["sensors"]),
                     action_dim=action_dim, proprio_dim=proprio_dim, **shape)


def pretrain(cfg: DictConfig, say: Callable[[str], None] = print, progress=None, command: str = "") -> dict[str, Any]:
    """Train (or resume), evaluate, and write the base; ``command`` is recorded as what made it."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    env_kwargs = to_dict(cfg.env)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.action_head not in ACTION_HEADS:
        raise ConfigError(f"action_head={cfg.action_head!r} is unknown: choose one of {list(ACTION_HEADS)}")
    model = SmallVLA(vla_config_for(env_kwargs, action_head=cfg.action_head, bins=cfg.bins))
    trainer = BCTrainer(model, lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    ckpts = CheckpointDir(out / "checkpoints", prefix="step", keep=2)
    step, history = 0, []
    latest = ckpts.latest_good(with_state=True)
    if latest is not None:
        step, weights, meta, state = latest
        model.load_weights(weights)
        trainer.optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # the flow-matching noise and times: resumed exactly
        history = meta.get("history", [])
        say(f"pretrain: resuming from step {step} in {out}")

    store = EpisodeStore(out / "demos")
    # In seed order, as when they were made: a resumed run samples the same batches as an uninterrupted one.
    demos = sorted(store.iter("train", with_ground_truth=True), key=lambda ep: ep.seed)
    if len(demos) != cfg.demos:
        seeds = [split_seed("train", i) for i in range(cfg.demos)]
        demos = run_episodes(seeds, "train", None, policy_version=-1, operators=list(cfg.operators), **env_kwargs)
        if len(store) == 0:
            for ep in demos:
                store.add(ep)
    say(f"pretrain: {len(demos)} demonstrations, success {np.mean([e.ground_truth['success'] for e in demos]):.2f}")
    data = ChunkDataset(model, max_episodes=max(cfg.demos, 1))
    data.add(demos, pinned=True)

    started, losses = time.time(), []
    while step < cfg.steps:
        trainer.schedule(warmup_cosine(step, cfg.steps, cfg.warmup))
        losses.append(trainer.step(data.sample(cfg.batch_size, generator)))
        step += 1
        if progress is not None:
            progress(step, cfg.steps, losses[-1])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = evaluate_policy(model, cfg.eval_episodes, env_kwargs)
            history.append({"step": step, "loss": float(np.mean(losses[-cfg.eval_every:])), **ev})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(history[-1]) + "\n")
            say(f"pretrain: step {step}  loss {history[-1]['loss']:.4f}  held-out success {ev['success']:.3f} "
                f"[{ev['ci95'][0]:.3f}, {ev['ci95'][1]:.3f}]  {ev['per_task']}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpts.save(step, model.get_weights(), {"history": history},
                       state={"optimizer": trainer.optimizer.state_dict(), "generator": generator.get_state(),
                              "torch_rng": torch.get_rng_state()})
    final = history[-1] if history else evaluate_policy(model, cfg.eval_episodes, env_kwargs)
    record = {
        "description": f"small VLA{' with action tokens' if cfg.action_head == 'tokens' else ''}, behaviour cloning "
                       f"on {cfg.demos} scripted demonstrations for {cfg.steps} steps",
        "command": command,
        "seed": cfg.seed,
        "code": code_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "final": final,
        "history": history,
        "train_seconds_this_session": time.time() - started,
    }
    save_policy(out / "base_vla.safetensors", model, record)
    atomic_write_bytes(out / "base_vla.json", json.dumps(record, indent=2).encode())
    if cfg.export:
        export = Path(cfg.export)
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "base_vla.safetensors", export)
        shutil.copyfile(out / "base_vla.json", export.with_suffix(".json"))
        say(f"pretrain: exported the base to {export}")
    return record


def code_commit() -> str | None:
    """The git commit of the code running (``+changes`` when tracked files differ from it), or None outside a git
    checkout of flywheel (an installed copy inside a user's own repository is not it). A base's record names it
    because the command alone reproduces a base only on the same code: a change that keeps the model's function but
    rounds differently (outputs within 3e-6) sends 6,000 steps down another path, to a base of similar loss whose
    success differs by a few points."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:  # installed inside another repository
            return None
        head = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if changed else "")
