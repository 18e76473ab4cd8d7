"""``flywheel pretrain``: behaviour cloning of the small VLA (or a π0, ``model=pi0``) on a limited set of scripted
demonstrations.

Resumable: started again with the same ``out_dir`` it continues from the newest good checkpoint (weights,
optimizer, step and sampler state), so an interrupted hour is not lost. At the end it writes
``out_dir/base_vla.safetensors`` and ``out_dir/base_vla.json`` (the command, seed and metrics that made it), and with
``export=PATH`` copies both there (the repository ships one at flywheel/assets/). A π0 is written as an openpi
checkpoint directory, ``out_dir/base_pi0`` (with ``base_vla.json`` inside), which ``policy=pi0`` loads.
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

from actors.instructions import every_instruction
from actors.rollout import make_env, run_episodes
from actors.tabletop import split_seed
from flywheel.checkpoint import CheckpointDir, CheckpointError
from flywheel.config import ConfigError, to_dict
from flywheel.contracts import sensor_inputs
from flywheel.metrics import wilson_interval
from flywheel.store import EpisodeStore, atomic_write_bytes
from flywheel.vla.checkpoint import load_policy_checkpoint, save_policy
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
    if cfg.model not in ("small_vla", "pi0"):
        raise ConfigError(f"model={cfg.model!r} is unknown: choose small_vla or pi0")
    demos = load_demos(cfg, out, env_kwargs)  # (drawing no torch randomness: the model's initialisation is the same)
    known = [e.ground_truth["success"] for e in demos if e.ground_truth]
    say(f"pretrain: {len(demos)} demonstrations" + (f", success {np.mean(known):.2f}" if known else
                                                     f" from {cfg.demos_from}"))
    if cfg.model == "pi0":
        model = initial_pi0(cfg, out, env_kwargs, demos)
    else:
        model = initial_small_vla(cfg, env_kwargs, say)
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
    what = "π0" if cfg.model == "pi0" else f"small VLA{' with action tokens' if cfg.action_head == 'tokens' else ''}"
    record = {
        "description": f"{what}, behaviour cloning on {cfg.demos} "
                       f"{'demonstrations of ' + cfg.demos_from if cfg.demos_from else 'scripted demonstrations'} "
                       f"for {cfg.steps} steps",
        "command": command,
        "seed": cfg.seed,
        "code": code_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "final": final,
        "history": history,
        "train_seconds_this_session": time.time() - started,
    }
    if cfg.model == "pi0":
        return export_pi0(cfg, out, model, record, say)
    save_policy(out / "base_vla.safetensors", model, record)
    atomic_write_bytes(out / "base_vla.json", json.dumps(record, indent=2).encode())
    if cfg.export:
        export = Path(cfg.export)
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "base_vla.safetensors", export)
        shutil.copyfile(out / "base_vla.json", export.with_suffix(".json"))
        say(f"pretrain: exported the base to {export}")
    return record


def initial_small_vla(cfg: DictConfig, env_kwargs: dict, say: Callable[[str], None]) -> SmallVLA:
    """A new small VLA shaped for the environment, or the checkpoint ``cfg.init`` (with a fresh subtask head where
    ``cfg.subtask_head`` asks for one and it has none)."""
    fit = vla_config_for(env_kwargs, action_head=cfg.action_head, bins=cfg.bins, subtask_head=cfg.subtask_head)
    if not cfg.init:
        return SmallVLA(fit)
    try:
        model, _ = load_policy_checkpoint(cfg.init, as_model=True, subtask_head=cfg.subtask_head)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"init={cfg.init}: {e}") from e
    shape = ("image_size", "sensors", "action_dim", "proprio_dim")
    wrong = {k: (getattr(model.cfg, k), getattr(fit, k)) for k in shape if getattr(model.cfg, k) != getattr(fit, k)}
    if wrong:
        raise ConfigError(f"init={cfg.init} does not fit the environment (checkpoint, environment): {wrong}. Set env.* "
                          f"as it was pretrained (its .json records them), or pretrain from scratch (init='')")
    say(f"pretrain: starting from {cfg.init}" + (", with a subtask head" if cfg.subtask_head else ""))
    return model


def load_demos(cfg: DictConfig, out: Path, env_kwargs: dict) -> list:
    """The demonstrations: the first ``cfg.demos`` episodes of the LeRobot dataset ``cfg.demos_from``, or the
    scripted expert's, made once into ``out/demos`` and read back in seed order (as made: a resumed run samples the
    same batches as an uninterrupted one)."""
    if cfg.demos_from:
        return dataset_demos(cfg.demos_from, cfg.demo_keys, cfg.demos, env_kwargs)
    store = EpisodeStore(out / "demos")
    demos = sorted(store.iter("train", with_ground_truth=True), key=lambda ep: ep.seed)
    if len(demos) != cfg.demos:
        seeds = [split_seed("train", i) for i in range(cfg.demos)]
        demos = run_episodes(seeds, "train", None, policy_version=-1, expert={"operators": list(cfg.operators)},
                             **env_kwargs)
        if len(store) == 0:
            for ep in demos:
                store.add(ep)
    return demos


def dataset_demos(root: str, keys: Any, n: int, env_kwargs: dict) -> list:
    """Demonstrations from a LeRobot dataset, checked against the environment the policy acts in."""
    from flywheel.config import DatasetKeys
    from flywheel.lerobot_format import DatasetError
    from flywheel.lerobot_import import demonstrations

    try:
        demos = demonstrations(root, DatasetKeys(**(keys if isinstance(keys, dict) else to_dict(keys))), n, env_kwargs["image_size"])
    except DatasetError as e:
        raise ConfigError(f"demos_from={root}: {e}") from e
    probe = make_env(**{k: v for k, v in env_kwargs.items() if k != "execute"})
    try:
        want = {"action": probe.action_space.shape[0], "proprio": probe.observation_space["proprio"].shape[0]}
    finally:
        getattr(probe, "release", probe.close)()
    have = {"action": demos[0].actions.shape[1], "proprio": demos[0].observations["proprio"].shape[1]}
    if have != want:
        raise ConfigError(f"demos_from={root}: its episodes have {have} dimensions, the environment env.name="
                          f"{env_kwargs.get('name')} {want}: map the dataset's keys with demo_keys.proprio and "
                          f"demo_keys.action, or pretrain for the environment it was recorded in")
    return demos


def initial_pi0(cfg: DictConfig, out: Path, env_kwargs: dict, demos: list):
    """A π0 shaped by ``cfg.pi0`` for these environments, initialised (once, into ``out/init_pi0``: a tokenizer of
    every instruction of the built-in tasks, the demonstrations' statistics, random weights) and loaded from there
    as ``policy=pi0`` loads any openpi checkpoint."""
    from flywheel.vla.bundle import pi0
    from flywheel.vla.pi0 import Pi0Config
    from flywheel.vla.pi0_policy import init_checkpoint

    p = cfg.pi0
    sensors = tuple(env_kwargs["sensors"])
    init = out / "init_pi0"
    if not (init / "flywheel.json").is_file():
        states = np.concatenate([sensor_inputs(ep.observations, sensors)[1] for ep in demos])
        actions = np.concatenate([ep.actions for ep in demos])
        try:
            shape = Pi0Config(action_dim=actions.shape[-1], action_horizon=p.action_horizon, precision="float32",
                              paligemma_variant=p.paligemma_variant, action_expert_variant=p.action_expert_variant,
                              vision_variant=p.vision_variant, pi05=p.pi05, vocab_size=p.vocab_size,
                              max_token_len=p.max_token_len or (48 if p.pi05 else 24),
                              image_slots=max(1, len([s for s in sensors if s in ("overhead", "wrist")])))
        except ValueError as e:
            raise ConfigError(f"pi0.*: {e}") from e
        init_checkpoint(init, shape, every_instruction(), states, actions, sensors, seed=cfg.seed)
    bundle = pi0(str(init))
    model = bundle.make_model()
    model.load_weights(bundle.weights)
    return model


def export_pi0(cfg: DictConfig, out: Path, model, record: dict[str, Any], say: Callable[[str], None]) -> dict:
    """The trained π0 as an openpi checkpoint directory, ``out/base_pi0`` (and ``export``, a copy)."""
    from flywheel.vla import openpi

    base = out / "base_pi0"
    openpi.save(base, model, model.spec.norm_stats, tokenizer=model.spec.tokenizer,
                record={"sensors": list(model.sensors), "action_dim": model.action_dim,
                        **{k: record[k] for k in ("description", "config", "final")}})
    atomic_write_bytes(base / "base_vla.json", json.dumps(record, indent=2).encode())
    if cfg.export:
        shutil.copytree(base, cfg.export, dirs_exist_ok=True)
        say(f"pretrain: exported the base to {cfg.export}")
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
