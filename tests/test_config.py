import pytest

from flywheel.config import ConfigError, load_config


def test_defaults_and_overrides_compose():
    cfg = load_config("run", ["run_dir=runs/x", "budget.minutes=480"])
    assert cfg.budget.minutes == 480 and cfg.rollout.num_workers == 2


def test_experiment_presets():
    cfg = load_config("run", ["experiment=smoke", "run_dir=x"])
    assert cfg.experiment == "smoke" and cfg.budget.minutes <= 5


def test_a_wrong_key_names_itself():
    with pytest.raises(ConfigError, match="budget.minuets"):
        load_config("run", ["budget.minuets=3"])


def test_a_wrong_type_fails():
    with pytest.raises(ConfigError, match="budget.minutes"):
        load_config("run", ["budget.minutes=lots"])


def test_an_unknown_experiment_fails():
    with pytest.raises(ConfigError):
        load_config("run", ["experiment=nope"])


def test_counts_below_one_and_unparsable_overrides_are_config_errors():
    import pytest

    from flywheel.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="detector.ensemble=0.*at least 1"):
        load_config("run", ["detector.ensemble=0"])
    with pytest.raises(ConfigError, match="eval.noise=-1.0.*at least 0"):
        load_config("run", ["eval.noise=-1"])
    assert load_config("run", []).eval.noise == 0.0  # the flow from its mean, as deployed
    assert load_config("run", ["eval.noise=1"]).eval.noise == 1
    assert load_config("run", ["eval.noise=null"]).eval.noise is None  # as each learner's snapshot asks
    with pytest.raises(ConfigError, match="Valid keys"):
        load_config("run", ["--help"])
    with pytest.raises(ConfigError, match=r"(?s)full_key: budget.minute\n.*\nDid you mean budget.minutes\?"):
        load_config("run", ["budget.minute=5"])  # a misspelt key: the one meant, named


def test_a_detector_camera_the_episodes_do_not_record_is_a_config_error():
    with pytest.raises(ConfigError, match=r"env.sensors=\['overhead'\] does not record \['wrist'\]: add them"):
        load_config("run", ["detector.sensors=[overhead,wrist]", "env.sensors=[overhead]"])
    cfg = load_config("run", ["detector.sensors=[overhead,wrist]", "env.sensors=[overhead,wrist]"])
    assert list(cfg.detector.sensors) == ["overhead", "wrist"]


def test_help_anywhere_after_the_command_lists_the_keys(capsys):
    from flywheel.cli import main

    for argv in (["run", "--help"], ["run", "budget.minutes=480", "--help"], ["reward", "train", "-h"]):
        assert main(argv) == 0
        assert "budget.minutes" in capsys.readouterr().out


def test_ctrl_c_ends_a_command_without_a_traceback_and_says_how_to_go_on(capsys, monkeypatch):
    """A resumable command interrupted outside a run's graceful stop exits 130 and says that the same command
    continues; `flywheel run` says it itself, with its run_dir (flywheel/run.py)."""
    import flywheel.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["pretrain", "steps=10"]) == 130
    assert "the same command again continues" in capsys.readouterr().out
    assert cli.main(["run"]) == 130
    assert capsys.readouterr().out == ""


def test_reward_train_reads_a_run_as_it_was_recorded(tmp_path):
    """`flywheel reward train run_dir=...` takes the run's cameras, image size and horizon from its config.yaml unless
    the command line gives them: the detector then judges from every camera the run recorded."""
    from omegaconf import OmegaConf

    from flywheel.cli import as_recorded

    recorded = load_config("run", [f"run_dir={tmp_path}", "env.sensors=[overhead,wrist]", "env.max_steps=60"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(recorded))
    cfg = load_config("run", as_recorded([f"run_dir={tmp_path}", "detector.steps=10"]))
    assert list(cfg.env.sensors) == ["overhead", "wrist"] and cfg.env.max_steps == 60 and cfg.detector.steps == 10
    cfg = load_config("run", as_recorded([f"run_dir={tmp_path}", "env.max_steps=40"]))
    assert cfg.env.max_steps == 40  # the command line wins
    assert as_recorded(["run_dir=" + str(tmp_path / "nowhere")]) == ["run_dir=" + str(tmp_path / "nowhere")]


def test_a_gpu_learner_on_a_machine_without_one_is_refused_with_the_fix(monkeypatch):
    import torch

    from flywheel.parts import build_learner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"placement.device=cuda.*sees no GPU.*placement.device=auto"):
        build_learner({"algorithm": "filtered_bc", "demos": 0}, 0, None, {}, device="cuda")


def test_an_unknown_demonstrator_is_a_config_error():
    with pytest.raises(ConfigError, match="operators=.*nobody.*standard"):
        load_config("pretrain", ["operators=[standard,nobody]"])
    assert list(load_config("demos", ["out_dir=x", "operators=[standard,carrier]"]).operators) == ["standard", "carrier"]


def test_a_task_family_no_simulator_knows_is_refused_before_anything_starts(tmp_path):
    from flywheel.run import run

    with pytest.raises(ConfigError, match=r"env.name='mujoco' is unknown: choose one of \['fetch', 'libero', 'metaworld', "
                                          r"'robot', 'tabletop'\]"):
        load_config("run", ["experiment=tiny", "env=mujoco"])
    for given, says in (("env.family=pushh", "env.family='pushh' cannot be made: unknown task family 'pushh': choose"),
                        ("env=no_such_lab.sims:make_env", "env.name='no_such_lab.sims:make_env': .*cannot import "
                                                           "no_such_lab.sims.*PYTHONPATH")):
        cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'r'}", given])
        with pytest.raises(ConfigError, match=says):
            run(cfg)
        assert not (tmp_path / "r").exists()


def test_deterministic_practice_with_repeated_attempts_is_refused_before_anything_starts(tmp_path):
    from flywheel.run import run

    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'r'}", "learner.practice_noise=0"])
    with pytest.raises(ConfigError, match="group_size=2 with learner.practice_noise=0.*rollout.group_size=1"):
        run(cfg)
    assert not (tmp_path / "r").exists()
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'r'}", "learner=ppo", "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="group_size=1 with learner.advantage=group.*learner.advantage=gae"):
        run(cfg)  # GRPO with one attempt a layout would learn nothing, silently
    assert not (tmp_path / "r").exists()


def test_values_out_of_their_range_are_config_errors():
    for override, message in (("detector.threshold=1.5", r"detector.threshold=1.5: .*\[0, 1\]"),
                              ("budget.minutes=-1", r"budget.minutes=-1.*more than 0"),
                              ("learner=filtered_bc learner.practice_noise=-0.5", r"practice_noise=-0.5.*at least 0"),
                              ("learner=ppo learner.flow_noise=0", r"flow_noise=0.*more than 0"),
                              ("learner=ppo learner.advantage=critic", r"advantage=critic.*choose group .* or gae"),
                              ("learner=ppo learner.noise_at=chunk", r"noise_at=chunk.*choose steps .* or output"),
                              ("learner=recap learner.credit=step", r"credit=step.*choose episode .* or chunk"),
                              ("learner=recap learner.positive_fraction=1.5", r"positive_fraction=1.5.*fraction in \(0, 1\)"),
                              ("rollout.corrections=2", r"corrections=2.*share of practice episodes"),
                              ("rollout.coaching=-0.5", r"coaching=-0.5.*share of practice episodes"),
                              ("rollout.correct_after=0", r"correct_after=0.*at least 1"),
                              ("rollout.trim_idle_s=-1", r"trim_idle_s=-1.0.*at least 0, or null"),
                              ("eval.judge=human", r"judge=human.*choose ground_truth .* or detector"),
                              ("gate.audit=-1", r"gate.audit=-1.*at least 0")):
        with pytest.raises(ConfigError, match=message):
            load_config("run", override.split())


def test_chunk_credit_without_a_share_of_positives_is_a_config_error():
    with pytest.raises(ConfigError, match="credit=chunk.*positive_fraction in \\(0, 1\\)"):
        load_config("run", ["run_dir=x", "learner.algorithm=recap", "learner.credit=chunk"])
    load_config("run", ["run_dir=x", "learner.algorithm=recap", "learner.credit=chunk", "learner.positive_fraction=0.3"])


def test_an_unknown_plug_in_or_a_missing_detector_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"detector.name='oracle' is unknown: choose one of \['ground_truth', "
                                          r"'learned', 'people'\], or give an import path module:factory"):
        load_config("run", ["run_dir=x", "detector=oracle"])
    with pytest.raises(ConfigError, match=r"learner.algorithm='token_ppo' is unknown: choose one of .*'ppo'"):
        load_config("run", ["run_dir=x", "learner=token_ppo"])
    with pytest.raises(ConfigError, match="detector.checkpoint=.*no such file.*flywheel reward train"):
        load_config("run", ["run_dir=x", f"detector.checkpoint={tmp_path / 'nothing.safetensors'}"])


def test_each_learner_practises_as_it_learns_best_unless_told():
    """PPO compares 4 attempts at each layout in small iterations, the cloning learners one attempt in large ones;
    a preset's or the command line's values win."""
    def practice(*overrides):
        cfg = load_config("run", ["run_dir=x", *overrides])
        return cfg.rollout.episodes_per_iteration, cfg.rollout.group_size, cfg.eval.every

    assert practice() == practice("learner=ppo") == (128, 4, 8)  # the default job; evaluated every 1,024 episodes
    assert practice("learner=filtered_bc") == practice("learner=recap") == (512, 1, 2)
    assert practice("experiment=tiny", "learner=ppo") == (32, 2, 1)
    assert practice("learner=ppo", "rollout.group_size=8", "rollout.episodes_per_iteration=64", "eval.every=3") == \
        (64, 8, 3)


def test_each_algorithm_has_its_own_keys_and_refuses_anothers():
    assert load_config("run", ["run_dir=x", "learner=ppo", "learner.ppo_lr=3e-4"]).learner.ppo_lr == 3e-4
    with pytest.raises(ConfigError, match=r"learner.steps_per_update is not a key of learner=ppo: it takes advantage, "
                                          r"anchor, .*ppo_lr"):
        load_config("run", ["run_dir=x", "learner=ppo", "learner.steps_per_update=3"])
    with pytest.raises(ConfigError, match=r"learner.guidance is not a key of learner=filtered_bc: it takes .*"
                                          r"steps_per_update"):
        load_config("run", ["run_dir=x", "learner=filtered_bc", "learner.guidance=3"])
    assert load_config("run", ["run_dir=x", "learner.algorithm=recap"]).learner.guidance == 3.0  # its group
    tiny = load_config("run", ["run_dir=x", "experiment=tiny", "learner=ppo"]).learner
    assert tiny.algorithm == "ppo" and tiny.demos == 40  # a preset's keys common to all apply to the one chosen
    assert load_config("run", ["run_dir=x", "experiment=tiny"]).learner.steps_per_update == 20  # its own variant
    mine = load_config("run", ["run_dir=x", "learner=my_lab.learners:Mine", "learner.options={steps:5}"]).learner
    assert mine.algorithm == "my_lab.learners:Mine" and dict(mine.options) == {"steps": 5}


def test_where_the_learner_runs_is_a_section_of_its_own():
    cfg = load_config("run", ["run_dir=x", "learner=ppo", "placement.remote=true", "placement.gpus=1"])
    assert cfg.placement.remote and cfg.placement.gpus == 1 and "remote" not in cfg.learner
