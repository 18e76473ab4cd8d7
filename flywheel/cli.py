"""The ``flywheel`` command.

    flywheel run [key=value ...]            the self-improvement loop (Hydra overrides: budget.minutes=480, ...);
                                            on a run_dir that holds a run, resume it. learner=ppo chooses the
                                            algorithm; policy=, env=, detector= a plug-in (module:factory)
    flywheel run -m learner=ppo,recap seed=1,2   a sweep: one run per combination, under run_dir, + sweep.json
    flywheel pretrain [key=value ...]       behaviour-clone the small VLA on scripted demonstrations (resumable)
    flywheel reward train [key=value ...]   train a success detector on a run's labelled episodes
    flywheel reward eval run_dir=PATH [detector=FILE]   the detector's report: PATH/reward/report.{json,html}
    flywheel reward relabel detector=FILE store=PATH [dataset=DIR]   a detector judges every episode of a store (of a
                                            LeRobot dataset, imported into it first); labels added, nothing rewritten
    flywheel data export run_dir=PATH out=DIR [split= versions= label= ...]   a run's episodes into a LeRobotDataset
                                            v3.0 with their lineage; a second export appends to the same dataset
    flywheel data import dataset=DIR store=PATH [dataset_keys.image=...]   a local LeRobotDataset v3.0 into a store
    flywheel demos out_dir=PATH [key=value ...]  scripted demonstrations into an episode store (resumable)
    flywheel report RUN_DIR                 the run at a glance: RUN_DIR/report.html, self-contained (no network)
    flywheel serve [key=value ...] [--port N] [--api-key KEY]   serve policy.checkpoint over a websocket in openpi's
                                            protocol (openpi_client.WebsocketClientPolicy, policy.name=remote)
    flywheel robot-host [key=value ...]     serve one robot (robot.driver=sim, or yours) to a run's env.name=robot
                                            over a websocket, its command watchdog on this side (actors/robot_host.py)
    flywheel page run_dir=PATH [robots={name:ws://host:8780}]   the web page for the people at the robots: live
                                            view, e-stop, scene reset, takeover, and verdicts into the store
    flywheel store verify run_dir=PATH      read every stored episode; print what was found as JSON (after a crash)
    flywheel store check RUN_DIR [--repair] find (and move aside) damaged episode files
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()


def error(message: object) -> None:
    """An error line on the console: the message as written, its [brackets] text rather than Rich markup (an error
    that names env.sensors=[overhead,wrist] must show them)."""
    console.print("[red]error:[/red] " + escape(str(message)), highlight=False)


def _schema_help(name: str, overrides: list[str]) -> str:
    """The config with ``overrides`` (``learner=ppo --help`` shows PPO's keys)."""
    from omegaconf import OmegaConf

    from flywheel.config import load_config

    cfg = load_config(name, [o for o in overrides if "=" in o and not o.startswith("run_dir=")])
    return OmegaConf.to_yaml(cfg)


def _load(name: str, overrides: list[str]):
    from flywheel.config import ConfigError, load_config

    try:
        return load_config(name, overrides)
    except ConfigError as e:
        error(e)
        sys.exit(2)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def cmd_run(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    if {"-m", "--multirun"} & set(overrides):
        return cmd_sweep([o for o in overrides if o not in ("-m", "--multirun")])
    cfg = _load("run", overrides)
    if OmegaConf.is_missing(cfg, "run_dir"):
        OmegaConf.update(cfg, "run_dir", f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    from flywheel.resume import resumed_config
    from flywheel.run import run

    cfg = resumed_config(cfg, overrides)  # a run_dir that holds a run: its own config, resumed

    budget_s = cfg.budget.minutes * 60
    with _progress() as progress:
        task = progress.add_task("flywheel", total=budget_s, info="starting")
        start = time.time()

        def on_iteration(state, row):
            last = state.evaluations[-1]
            info = (f"iter {state.iteration}  v{row.get('policy_version', last.version)}  episodes {state.episodes}  "
                    f"held-out success {last.success:.3f} (v{last.version})")
            progress.update(task, completed=min(budget_s, time.time() - start), info=info)
            if "iteration" in row:
                progress.console.print(
                    f"iter {row['iteration']:3d}  v{row['policy_version']}  claimed {row['train/claimed_success']:.2f}"
                    f"  true {row['train/true_success']:.2f}  kept {row.get('learner/kept_episodes', 0)}"
                    + (f"  audit {row['audit/claimed_success']:.2f}/{row['audit/audited_success']:.2f}"
                       if "audit/gap" in row else "")
                    + ("  [red]ALARM: updates paused, detector retrained[/red]" if row.get("audit/alarm") else "")
                    + (f"  [yellow]gate: held back v{row['policy_version'] - 1} "
                       f"({row['gate/difference']:+.3f}), back to v{row['gate/rollback_to']}'s weights[/yellow]"
                       if "gate/rollback_to" in row else "")
                    + (f"  eval {row['eval/success']:.3f}" if "eval/success" in row else "")
                )

        summary = run(cfg, say=lambda m: progress.console.print(m), on_iteration=on_iteration)
        progress.update(task, completed=budget_s)
    stopped = f"  (stopped early: {summary['stop_reason']})" if summary["status"] == "stopped" else ""
    console.print(f"\nrun: [bold]{summary['run_dir']}[/bold]{stopped}")
    if stopped:  # a newcomer's Ctrl-C: say how to go on from where it stopped
        again = " ".join(["flywheel run", f"run_dir={summary['run_dir']}",
                          *(o for o in overrides if not o.startswith("run_dir="))])
        console.print(f"to go on from here: {again}  (it resumes; budget.* may be raised)")
    console.print(
        f"held-out success (ground truth, {summary['eval_episodes']} episodes, same seeds): "
        f"before {summary['initial_success']:.3f} [{summary['initial_ci95'][0]:.3f}, {summary['initial_ci95'][1]:.3f}]"
        f"  ->  after {summary['final_success']:.3f} [{summary['final_ci95'][0]:.3f}, {summary['final_ci95'][1]:.3f}]"
        f"   (policy v{summary['policy_version_final']}, {summary['episodes']} episodes, "
        f"{summary['wall_seconds'] / 60:.1f} min)"
    )
    rob = summary.get("robustness") or {}
    if rob.get("measured"):
        ci = lambda f: f"{f['success']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]"  # noqa: E731
        console.print(f"under held-out randomisation ({rob['episodes']} other held-out seeds): before "
                      f"{ci(rob['initial']['randomized'])}  ->  after {ci(rob['final']['randomized'])}")
    return 0


def cmd_sweep(overrides: list[str]) -> int:
    """``flywheel run -m learner=ppo,recap seed=1,2``: one run per combination (flywheel/sweep.py)."""
    from flywheel.sweep import combinations, sweep

    for one in combinations(overrides):  # every combination's config composes before the first run starts
        _load("run", [*one, "run_dir=sweep"])
    summary = sweep(overrides, say=console.print)
    return 0 if summary["completed"] == len(summary["runs"]) else 1


def cmd_pretrain(overrides: list[str]) -> int:
    cfg = _load("pretrain", overrides)
    from flywheel.pretrain import pretrain

    with _progress() as progress:
        task = progress.add_task("pretrain", total=cfg.steps, info="")

        def on_step(step, total, loss):
            if step % 25 == 0 or step == total:
                progress.update(task, completed=step, info=f"loss {loss:.4f}")

        record = pretrain(cfg, say=lambda m: progress.console.print(m), progress=on_step,
                          command=" ".join(["flywheel pretrain", *overrides]))
    base = Path(cfg.out_dir) / ("base_pi0" if cfg.model == "pi0" else "base_vla.safetensors")
    console.print(f"base: {base}  held-out success {record['final']['success']:.3f}")
    return 0


def as_recorded(overrides: list[str]) -> list[str]:
    """``overrides`` plus the run's own recording settings (``run_dir/config.yaml``: env.sensors, image_size,
    max_steps) where they give none, so that a detector trained on a run reads its episodes as they were recorded
    (every camera that was on) without the user repeating the run's command line."""
    given = dict(a.split("=", 1) for a in overrides if "=" in a)
    recorded = Path(given.get("run_dir", "")) / "config.yaml"
    if "run_dir" not in given or not recorded.is_file():
        return overrides
    from omegaconf import OmegaConf

    env = OmegaConf.to_container(OmegaConf.load(recorded)).get("env", {})
    show = lambda v: "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)  # noqa: E731
    return [f"env.{k}={show(env[k])}" for k in ("sensors", "image_size", "max_steps")
            if k in env and f"env.{k}" not in given] + overrides


def cmd_reward_train(overrides: list[str]) -> int:
    cfg = _load("run", as_recorded(overrides))
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "run_dir"):
        error("give the run directory: flywheel reward train run_dir=PATH")
        return 2
    from flywheel.parts import train_reward

    with _progress() as progress:
        task = progress.add_task("detector", total=cfg.detector.steps * cfg.detector.ensemble, info="")

        def on_step(step, steps, loss):
            progress.update(task, completed=step, info=f"loss {loss:.4f}")

        _, metrics = train_reward(cfg, say=lambda m: progress.console.print(m), progress=on_step, offline=True)
    console.print(json.dumps(metrics, indent=2))
    return 0


def cmd_reward_eval(args: list[str]) -> int:
    given = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(given) - {"run_dir", "detector", "seed"}) + [a for a in args if "=" not in a]
    if unknown or "run_dir" not in given:
        error(f"usage: flywheel reward eval run_dir=PATH [detector=FILE] [seed=N]"
              + (f" (not understood: {', '.join(unknown)})" if unknown else ""))
        return 2
    from reward.report import evaluate_run

    try:
        report = evaluate_run(given["run_dir"], given.get("detector"), seed=int(given.get("seed", 0)))
    except (FileNotFoundError, ValueError) as e:
        error(e)
        return 2
    keys = ("auroc", "precision", "recall", "ece", "swapped_instruction_rejection")
    console.print("newest policy (v{}): ".format(report["newest_policy_version"]) + "  ".join(
        f"{k} {report[k]:.3f}" if report[k] is not None else f"{k} —" for k in keys))
    console.print(f"report: {Path(given['run_dir']) / 'reward' / 'report.html'} (and report.json)")
    return 0


def _given(cfg, keys: tuple[str, ...], usage: str) -> bool:
    """Whether every required key was given; else says which are missing and how the command is used."""
    from omegaconf import OmegaConf

    absent = [k for k in keys if OmegaConf.is_missing(cfg, k)]
    if absent:
        error(f"give {' and '.join(f'{k}=...' for k in absent)}: {usage}")
    return not absent


def _store_at(path: str, create: bool = False):
    """The episode store of a run directory, or a store itself; a path that is not there is an error (a typo must not
    leave an empty directory behind) unless ``create``."""
    from flywheel.resume import RunDirError
    from flywheel.store import EpisodeStore

    root = Path(path)
    if not create and not root.is_dir():
        raise RunDirError(f"{root} does not exist: give a run's directory or an episode store")
    return EpisodeStore(root / "episodes" if (root / "episodes").is_dir() else root)


def cmd_reward_relabel(overrides: list[str]) -> int:
    cfg = _load("relabel", overrides)
    if not _given(cfg, ("detector", "store"), "flywheel reward relabel detector=FILE store=PATH [dataset=DIR]"):
        return 2
    from flywheel.config import DatasetKeys, to_dict
    from flywheel.lerobot_import import import_dataset
    from reward.relabel import relabel
    from reward.report import load_detector

    if not Path(cfg.detector).is_file():
        error(f"detector={cfg.detector}: no such file (a detector's .safetensors: `flywheel "
              f"reward train` writes RUN_DIR/detector/detector-N.safetensors)")
        return 1
    try:
        detector, _ = load_detector(cfg.detector)
    except ValueError as e:
        error(e)
        return 1
    # A run numbers its detectors from 1, so "detector-2" of two runs are different detectors: the file's digest
    # tells them apart in the labels (and says which ones this detector has judged already).
    detector.version += "@" + hashlib.sha256(Path(cfg.detector).read_bytes()).hexdigest()[:10]
    store = _store_at(cfg.store, create=bool(cfg.dataset))  # a dataset is imported into a new store
    if cfg.dataset:
        console.print(import_dataset(cfg.dataset, store, DatasetKeys(**to_dict(cfg.dataset_keys))))
    with _progress() as progress:
        task = progress.add_task("relabel", total=None, info="")
        report = relabel(store, detector, batch=cfg.batch,
                         progress=lambda done, total: progress.update(task, completed=done, total=total))
    print(json.dumps(report, indent=2))
    return 0


def cmd_data_export(overrides: list[str]) -> int:
    cfg = _load("data_export", overrides)
    if not _given(cfg, ("run_dir", "out"), "flywheel data export run_dir=PATH out=DIR [split=... versions=[...] "
                                            "label=success|failure human_only=true corrected_only=true]"):
        return 2
    from flywheel.lerobot_export import Layout, Selection, VideoSettings, export_store

    try:
        selection = Selection(split=cfg.split, versions=None if cfg.versions is None else list(cfg.versions),
                              label=cfg.label, human_only=cfg.human_only, corrected_only=cfg.corrected_only)
    except ValueError as e:
        error(e)
        return 2
    store = _store_at(cfg.run_dir)
    if not store.paths():
        error(f"{store.root} holds no episodes: give a run's directory or an episode store")
        return 1
    with _progress() as progress:
        task = progress.add_task("export", total=None, info="")
        report = export_store(store, cfg.out, selection, Layout(fps=cfg.fps, robot_type=cfg.robot_type),
                              VideoSettings(pix_fmt=cfg.pix_fmt, crf=cfg.crf),
                              progress=lambda done, total: progress.update(task, completed=done, total=total))
    print(json.dumps(report, indent=2))
    return 0


def cmd_data_import(overrides: list[str]) -> int:
    cfg = _load("data_import", overrides)
    if not _given(cfg, ("dataset", "store"),
                  "flywheel data import dataset=DIR store=PATH [dataset_keys.image=... demos=true]"):
        return 2
    from flywheel.config import DatasetKeys, to_dict
    from flywheel.lerobot_import import import_dataset
    from flywheel.store import EpisodeStore

    with _progress() as progress:
        task = progress.add_task("import", total=None, info="")
        report = import_dataset(cfg.dataset, EpisodeStore(cfg.store), DatasetKeys(**to_dict(cfg.dataset_keys)),
                                cfg.split, cfg.demos,
                                progress=lambda done, total: progress.update(task, completed=done, total=total))
    print(json.dumps(report, indent=2))
    return 0


def cmd_demos(overrides: list[str]) -> int:
    cfg = _load("demos", overrides)
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "out_dir"):
        error("give the store: flywheel demos out_dir=PATH")
        return 2
    from flywheel.parts import write_demos

    write_demos(cfg, say=console.print)
    return 0


def cmd_report(args: list[str]) -> int:
    if len(args) != 1 or "=" in args[0] and not args[0].startswith("run_dir="):
        error("usage: flywheel report RUN_DIR")
        return 2
    from flywheel.report import write_report

    try:
        path = write_report(args[0].removeprefix("run_dir="))
    except FileNotFoundError as e:
        error(e)
        return 2
    console.print(f"report: {path}")
    return 0


def cmd_serve(args: list[str]) -> int:
    """``flywheel serve``: the policy over a websocket until Ctrl-C (flywheel/serve.py)."""
    parser = argparse.ArgumentParser(prog="flywheel serve", add_help=False)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key")
    flags, rest = parser.parse_known_args(args)
    unknown = [a for a in rest if "=" not in a]
    if unknown:
        error(f"usage: flywheel serve [key=value ...] [--host H] [--port N] [--api-key KEY] (not understood: "
              f"{' '.join(unknown)})")
        return 2
    cfg = _load("serve", rest)
    from flywheel.serve import API_KEY_ENV, PolicyServer, load_served

    served = load_served(cfg)
    api_key = flags.api_key or cfg.serve.api_key or os.environ.get(API_KEY_ENV) or None
    server = PolicyServer(served, host=flags.host or cfg.serve.host,
                          port=cfg.serve.port if flags.port is None else flags.port, api_key=api_key).start()
    print(f"serving {served.name} {served.checkpoint} at {server.url} (chunk {served.chunk}, action_dim "
          f"{served.action_dim}, sensors {list(served.sensors)}; {'API key required' if api_key else 'no API key'}; "
          f"health: http://{server.host}:{server.port}/healthz); Ctrl-C stops", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        console.print("server stopped")
    finally:
        server.stop()
    return 0


def cmd_store_check(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flywheel store check")
    parser.add_argument("run_dir")
    parser.add_argument("--repair", action="store_true", help="move damaged files to episodes/quarantine/")
    ns = parser.parse_args(args)
    store = _store_at(ns.run_dir)
    total = len(store)
    bad = store.check(repair=ns.repair)
    console.print(f"{total} episode files, {len(bad)} damaged")
    for p in bad:
        console.print(f"  {'moved to quarantine: ' if ns.repair else ''}{p}")
    return 1 if bad and not ns.repair else 0


def cmd_store_verify(args: list[str]) -> int:
    """Read every stored episode of a run and print what was found, as JSON (EpisodeStore.verify); exit 1 unless
    the store is whole."""
    given = dict(a.split("=", 1) for a in args if "=" in a)
    if set(given) != {"run_dir"} or len(given) != len(args):
        error("usage: flywheel store verify run_dir=PATH")
        return 2
    from flywheel.store import EpisodeStore

    root = Path(given["run_dir"])
    if not (root / "episodes").is_dir():
        error(f"{root} holds no episode store ({root / 'episodes'} is not a directory): "
              f"give a run's directory")
        return 1
    report = EpisodeStore(root / "episodes").verify()
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """Known errors (bad config, bad checkpoint, damaged episode file, unusable run directory) print their message,
    which says what to do, and exit 1; Ctrl-C exits 130 without a traceback; anything else keeps its traceback."""
    from flywheel.checkpoint import CheckpointError
    from flywheel.config import ConfigError
    from flywheel.detectors import DetectorUntrusted
    from flywheel.lerobot_format import DatasetError
    from flywheel.run import RunDirError
    from flywheel.store import CorruptEpisodeError

    try:
        with sigterm_interrupts():
            return _dispatch(argv)
    except (CheckpointError, ConfigError, CorruptEpisodeError, DatasetError, DetectorUntrusted, RunDirError) as e:
        error(e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside a run's graceful stop, or twice
        command = (sys.argv[1:] if argv is None else argv)[:1]
        if command != ["run"]:  # (a run says itself what it kept and how to go on: its run_dir may be a new one)
            console.print("interrupted: the same command again continues where this one stopped (pretrain, demos "
                          "and reward train keep their progress)", markup=False, highlight=False)
        return 128 + signal.SIGTERM if str(e).startswith("SIGTERM") else 130  # as the shell reports each


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler ending the job, `kill`) interrupts a command as Ctrl-C does: the command says what it
    kept and how to go on, rather than dying with Ray's stack dump. A run's loop stops more gently than that
    (flywheel/run.py graceful_stop): this covers everything else, such as the detector's collection and training
    before the loop. Only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_robot_host(args: list[str]) -> int:
    """``flywheel robot-host``: one robot over a websocket until Ctrl-C (actors/robot_host.py)."""
    cfg = _load("robot_host", args)
    from actors.robot_host import RobotHost
    from flywheel import plugins
    from flywheel.serve import API_KEY_ENV

    r = cfg.robot
    driver = plugins.call_with_accepted(plugins.resolve("robot", r.driver), {
        "family": r.family, "image_size": r.image_size, "sensors": tuple(r.sensors), "rate_hz": r.rate_hz})
    api_key = cfg.serve.api_key or os.environ.get(API_KEY_ENV) or None
    host = RobotHost(driver, host=cfg.serve.host, port=cfg.serve.port, api_key=api_key, watchdog_s=r.watchdog_s,
                     sensors=tuple(r.sensors)).start()
    print(f"robot host: {r.driver} at {host.url} (action_dim {driver.action_dim}, sensors {list(r.sensors)}, "
          f"watchdog {r.watchdog_s:g} s; {'API key required' if api_key else 'no API key'}; health: "
          f"http://{host.host}:{host.port}/healthz); a run reaches it with env.name=robot "
          f"env.options.robot={host.url}; Ctrl-C stops", flush=True)
    try:
        host.wait()
    except KeyboardInterrupt:
        console.print("robot host stopped; the robot was held")
    finally:
        host.stop()
        driver.close()
    return 0


def cmd_page(args: list[str]) -> int:
    """``flywheel page``: the robot page until Ctrl-C (flywheel/page.py)."""
    cfg = _load("page", args)
    from actors.robot_host import OperatorChannel, RobotHostError
    from flywheel.page import PageServer, make_app
    from flywheel.serve import API_KEY_ENV
    from flywheel.store import EpisodeStore

    root = Path(cfg.run_dir) / "episodes"
    if not root.is_dir():
        error(f"{cfg.run_dir} holds no episode store ({root} is not a directory): give "
              f"a run's directory")
        return 1
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        robots = {name: OperatorChannel(str(url), api_key=key) for name, url in cfg.robots.items()}
    except RobotHostError as e:
        error(e)
        return 1
    token = cfg.token or os.environ.get("FLYWHEEL_PAGE_TOKEN") or None
    try:
        page = PageServer(make_app(EpisodeStore(root), robots, token), host=cfg.host, port=cfg.port,
                          token=token).start()
    except ValueError as e:
        error(e)
        return 2
    print(f"robot page: {page.url}/ ({len(robots)} robot(s): {', '.join(robots) or 'none, labels only'}; "
          f"{'token required beyond loopback' if token else 'loopback only'}); Ctrl-C stops", flush=True)
    try:
        page.wait()
    except KeyboardInterrupt:
        console.print("robot page stopped")
    finally:
        page.stop()
        for channel in robots.values():
            channel.close()
    return 0


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("FLYWHEEL_LOG", "WARNING"))
    if not argv or argv[0] in ("-h", "--help"):
        console.print(__doc__, markup=False)
        return 0
    cmd, rest = argv[0], argv[1:]
    if {"-h", "--help"} & set(rest):  # anywhere after the command: `flywheel run budget.minutes=480 --help` too
        name = {"pretrain": "pretrain", "demos": "demos", "serve": "serve", "robot-host": "robot_host",
                "page": "page", "data": f"data_{rest[0]}" if rest[:1] in (["export"], ["import"]) else "run",
                "reward": "relabel" if rest[:1] == ["relabel"] else "run"}.get(cmd, "run")
        console.print(__doc__, markup=False)
        console.print("keys and defaults:\n" + _schema_help(name, rest), markup=False)
        return 0
    if cmd == "run":
        return cmd_run(rest)
    if cmd == "pretrain":
        return cmd_pretrain(rest)
    if cmd == "demos":
        return cmd_demos(rest)
    if cmd == "reward" and rest[:1] == ["train"]:
        return cmd_reward_train(rest[1:])
    if cmd == "reward" and rest[:1] == ["eval"]:
        return cmd_reward_eval(rest[1:])
    if cmd == "reward" and rest[:1] == ["relabel"]:
        return cmd_reward_relabel(rest[1:])
    if cmd == "data" and rest[:1] == ["export"]:
        return cmd_data_export(rest[1:])
    if cmd == "data" and rest[:1] == ["import"]:
        return cmd_data_import(rest[1:])
    if cmd == "report":
        return cmd_report(rest)
    if cmd == "serve":
        return cmd_serve(rest)
    if cmd == "robot-host":
        return cmd_robot_host(rest)
    if cmd == "page":
        return cmd_page(rest)
    if cmd == "store" and rest[:1] == ["verify"]:
        return cmd_store_verify(rest[1:])
    if cmd == "store" and rest[:1] == ["check"]:
        return cmd_store_check(rest[1:])
    error(f"unknown command {' '.join(argv[:2])!r}")
    console.print(__doc__, markup=False)
    return 2


if __name__ == "__main__":
    sys.exit(main())
