"""Structured configs: one dataclass per part, registered with Hydra's ConfigStore. YAML files under ``configs/``
only give values; a key that is not in these schemas fails when the config is composed, with a message naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclasses.dataclass
class RandomizeConfig:
    """Domain randomisation amplitudes, 0 = off (actors/tabletop.py TabletopEnv says what each one does)."""

    colour: float = 0.0
    lighting: float = 0.0
    camera: float = 0.0
    size: float = 0.0
    friction: float = 0.0


@dataclasses.dataclass
class EnvConfig:
    name: str = "tabletop"  # the environment plug-in: tabletop, metaworld, fetch, or an import path module:factory
    #                         (a gymnasium env factory, given the keys below that it declares; README "Bring your own")
    family: str = "any"  # tabletop: "any" (push or place, the shipped base's pair), "suite" (the first six), one
    #                     family, or a comma-separated list: push, place, stack, button, drawer, sort, clear, stow
    #                     (actors/tabletop.py; sort, clear and stow are long-horizon, made of named subtasks);
    #                     metaworld: its task (button-press-topdown-v3, ...); fetch: its env id (FetchReach-v4, ...)
    phrasing: str = "canonical"  # canonical (the one phrasing the shipped base knows) | train | heldout | all
    combos: str = "all"  # all | train | heldout: which named-colour pairings occur (actors/instructions.py)
    randomize: RandomizeConfig = field(default_factory=RandomizeConfig)
    sensors: list[str] = field(default_factory=lambda: ["overhead"])  # overhead, wrist, depth, touch; every
    #                   episode records each one that is on. The shipped VLA reads the overhead camera and proprio
    image_size: int = 64
    max_steps: int = 40  # episode horizon
    execute: int = 4  # actions of each predicted chunk executed before the policy is asked again
    options: dict[str, Any] = field(default_factory=dict)  # the plug-in's own keyword arguments; robot's: robot
    #                   (sim | ws://host:port | a robot plug-in), safety ({rate_hz, max_delta, watchdog_s, ...}:
    #                   actors/robot.py SafetySettings), instruction, api_key, timeout_s


@dataclasses.dataclass
class DatasetKeys:
    """Which features of a LeRobot dataset become the policy's inputs (flywheel/lerobot_import.py)."""

    image: str = ""  # the camera that is the policy's overhead image; "": observation.images.overhead, else the
    #                  dataset's first camera
    wrist: str = ""  # the camera that is its wrist image; "": observation.images.wrist where there is one
    proprio: str = "observation.state"
    action: str = "action"
    environment_state: str = "observation.environment_state"  # a simulator's privileged positions of the named
    #                    block and target (x, y, x, y), where recorded: the auxiliary targets of pretraining's grounding
    #                    loss, never a policy input; "" or absent: none
    success: str = ""  # a per-frame feature (its last frame's value) or an episode column holding the episode's
    #                    verdict, e.g. next.success; "": none (the labels of a flywheel export come back regardless)
    success_source: str = "human"  # whose verdict that is: human or ground_truth
    image_size: int = 0  # scale the cameras to this square size; 0: as stored (pretrain: env.image_size)


@dataclasses.dataclass
class PolicyConfig:
    name: str = "small_vla"  # the policy plug-in: small_vla (flywheel's own), or an import path module:factory
    #                          returning a flywheel.contracts.PolicyBundle (README "Bring your own")
    checkpoint: str = "base"  # what it starts from; small_vla: "base" (shipped in flywheel/assets), "base:NAME", or
    #                           a path to a .safetensors file flywheel wrote; pi0: an openpi or LeRobot checkpoint
    #                           directory (README, "Your π0 checkpoint")
    options: dict[str, Any] = field(default_factory=dict)  # the plug-in's own keyword arguments; pi0's:
    #                           vlm (train | frozen | lora), lora_rank, gradient_checkpointing, autocast (bf16 on CUDA),
    #                           tokenizer (a path), asset_id (policy.options={vlm:lora,gradient_checkpointing:true})


@dataclasses.dataclass
class DetectorConfig:
    name: str = "learned"  # who judges practice: learned (flywheel's success detector, trained or given below),
    #                        ground_truth (the simulator's record: in simulation only, the upper bound a learned
    #                        detector is measured by), or an import path module:factory (flywheel/detectors.py)
    checkpoint: str = "auto"  # a trained detector to judge with from the start instead of training one (the keys
    #                 below that make and train one then go unused): a .safetensors (`flywheel reward train`'s, or
    #                 another run's run_dir/detector/detector-N.safetensors), or base, the one shipped for the built-in
    #                 tabletop (flywheel/assets/base_detector.json: trained on the shipped base's episodes, as a run
    #                 trains one). auto: base where it fits the run (its environment, task family, cameras and image
    #                 size), else one trained in the run. "": always one trained in the run (~3 min on 2 cores)
    demo_episodes: int = 200  # scripted successes to train on
    # Hard examples made on purpose (actors/expert.py HARD_EXAMPLES), on the built-in tabletop only:
    near_miss_episodes: int = 200  # the block put just outside success (touching the pad, on the bowl's rim)
    near_hit_episodes: int = 100  # the block let go just inside success (inside the bowl's rim)
    hover_episodes: int = 100  # the block carried over the target and held there until time-out
    policy_episodes: int = 1000  # rollouts of the starting policy (successes and failures), labelled by the simulator
    heldout_fraction: float = 0.25  # of those episodes, kept out of training to measure the detector
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    threshold: float = 0.5  # P(success) at or above which the labeler calls an episode a success, unless
    #                         target_precision sets it
    min_auroc: float = 0.8  # the floor: a detector whose held-out AUROC is below it stops the run before the loop,
    #                         since practice judged by it would teach the policy the detector's mistakes; 0: none
    target_precision: float = 0.0  # > 0: the threshold is the lowest whose precision reaches this on the
    #                                calibration episodes, at the starting policy's success rate (reward/metrics.py).
    #                                Measured: 0.9 on 68 calibration episodes gave recall 0.06-0.66, so it is off
    calibration_fraction: float = 0.0  # of the training episodes, kept out of training to fit the temperature of
    #                                    P(success) and the threshold; 0: the held-out episodes serve (a split of
    #                                    0.15 cost ~0.03 AUROC on 450 episodes)
    init_from_policy: bool = True  # start the detector's encoder from the starting policy's (it already grounds)
    swaps: int = 1  # swapped-instruction negatives per success (measured: 3 raised rejection 0.86 -> 0.93 on the
    #                 newest policy, at a cost of ~0.005 AUROC, within seed noise)
    ensemble: int = 1  # members (reward/train.py train_detector): their spread is the detector's uncertainty
    window: int = 3  # frames judged together (the last and those before it, `stride` steps apart): a hand that has
    #                  just let go differs from one still holding the block over the target
    stride: int = 2
    sensors: list[str] = field(default_factory=list)  # the cameras it judges from; empty: every camera env.sensors
    #                    records. One the policy does not read starts with zero pixel weights. The wrist camera gives
    #                    it a close look at where the block ended: env.sensors=[overhead,wrist] took the newest
    #                    policy's AUROC from 0.954 to 0.996 (bench/RESULTS.md, "The detector's quality")
    augment: bool = True  # flips/transposes of the frame: valid for a top-down camera; turn off for other views


@dataclasses.dataclass
class LearnerConfig:
    """What every algorithm takes. ``learner=NAME`` chooses the algorithm and, with it, its own keys (the classes
    below); a key it does not take is an error naming those it does."""

    algorithm: str = MISSING  # the learner factory: the group's own, or (a variant that takes the same keys) a
    #                           registered name or an import path module:factory (learner/registry.py)
    demos: int = 100  # the pretraining demonstrations, replayed so the policy does not drift from them
    demos_from: str = ""  # a local LeRobotDataset v3.0 whose first `demos` episodes are replayed instead (a team's
    #                       own demonstrations, for a policy flywheel did not pretrain); "": those the base's record
    #                       names (its demos_from, else the scripted expert's)
    demo_keys: DatasetKeys = field(default_factory=DatasetKeys)  # which of its features are camera, state, action


@dataclasses.dataclass
class BCConfig(LearnerConfig):
    """``learner=filtered_bc`` and ``learner=imitation``: behaviour cloning of what the detector
    approved (filtered BC), or of the demonstrations alone (imitation, the control)."""

    algorithm: str = "filtered_bc"
    steps_per_update: int = 300  # gradient steps per iteration
    batch_size: int = 64
    lr: float = 2e-4  # the base ends its pretraining near 1e-4; more than ~3x that shocks it
    demo_fraction: float = 0.5  # of every batch, drawn from the replayed demonstrations
    max_episodes: int = 4000  # in-memory replay bound (oldest non-demo episodes dropped first)
    practice_noise: float = 0.0  # scale of the flow's starting noise in practice (evaluation samples as eval.noise
    #                              says). 0: one deterministic chunk per observation, so each success it clones is a
    #                              clean trajectory, not one of its noisy draws; repeated attempts at a layout would
    #                              then be identical, so it needs rollout.group_size=1
    clone: str = "executed"  # executed: clone what the policy did at every step, as a demonstration is cloned;
    #                          chunks: the chunks it sampled, at the steps it sampled them
    ema: float = 0.99  # > 0 publishes an exponential moving average of the weights (decay per step) instead of the
    #                    last step's, which carry that step's noise; training goes on from the trained weights. 0: off
    shrink: float = 0.0  # > 0: every update first shrinks the weights (theta <- shrink*theta + noise) and retrains
    #                      the whole buffer with warm-up + cosine (learner/filtered_bc.py::shrink_and_perturb)
    freeze_backbone: bool = False  # train the action expert only, on contexts cached once per sample: a step costs
    #                                no encoder pass, so an update can afford many more steps
    augment: bool = False  # every batch's images shifted by up to 4 pixels and their brightness scaled by 1 +- 0.2
    #                        (learner/bc.py augment_images): with env.randomize, how a policy closes the robustness
    #                        split's gap (bench/RESULTS.md, "The robustness split")


@dataclasses.dataclass
class ImitationConfig(BCConfig):
    algorithm: str = "imitation"


@dataclasses.dataclass
class RecapConfig(BCConfig):
    """``learner=recap``: advantage-conditioned behaviour cloning with a learned value (pi*0.6's RECAP)."""

    algorithm: str = "recap"
    guidance: float = 3.0  # classifier-free guidance weight when sampling (bench/RESULTS.md, RECAP)
    indicator_dropout: float = 0.3  # how often the advantage indicator is dropped in training
    indicator_lr: float = 3e-3  # the indicator embedding's own learning rate (it starts at zero)
    value_steps: int = 300  # value refit steps per update (learner/value.py)
    credit: str = "episode"  # episode (an episode's return against the value of its start, shared by its chunks) |
    #                          chunk (each chunk's n-step advantage; learner/recap.py says why it is not the default)
    lookahead: int = 2  # credit=chunk: chunks ahead that an advantage looks before bootstrapping from the value
    positive_fraction: float = 0.0  # 0 marks "positive" what the value says did better than expected (advantage >
    #                                 0); in (0, 1), the top share of each task family's chunks; credit=chunk needs one


@dataclasses.dataclass
class PPOConfig(LearnerConfig):
    """``learner=ppo`` (the default): PPO with group-relative (GRPO) or GAE advantages, on exact log-probabilities of
    the draws, and self-imitation of its own hard successes beside the demonstrations."""

    algorithm: str = "ppo"
    ppo_lr: float = 1e-4  # the learning rate (3e-4 with 8 epochs: clip fraction 0.16-0.34, and worse after 8 updates)
    ppo_epochs: int = 4  # passes over each iteration's decisions
    ppo_clip: float = 0.2  # the clipped ratio's bound
    ppo_minibatch: int = 256  # decisions per gradient step
    flow_noise: float = 0.2  # a flow VLA's std of its Gaussian draws in practice, which give a chunk its exact
    #                          log-probability; with noise_at=steps, ~0.03 (each of 10 steps)
    noise_at: str = "output"  # where flow_noise draws: output (the chunk only, around the deterministic flow: a
    #                           Gaussian policy, 10x fewer numbers to credit) | steps (every Euler step, as in piRL)
    advantage: str = "group"  # group (GRPO over rollout.group_size attempts a layout) | gae (a critic)
    gamma: float = 0.95  # advantage=gae: discount per decision (a quicker success is worth more)
    gae_lambda: float = 0.95  # advantage=gae: GAE's lambda
    value_epochs: int = 20  # advantage=gae: passes of the critic's refit per iteration
    anchor: float = 0.5  # weight of behaviour cloning on the replayed demonstrations beside PPO's loss
    max_staleness: int = 2  # episodes acted by a version older than this many updates are dropped
    batch_size: int = 64  # demonstrations per anchor step
    self_imitation: float = 0.5  # of every anchor batch, the share drawn from the policy's own approved successes
    #                              that beat their layout's other attempts, replayed from every update (learner/ppo.py;
    #                              bench/RESULTS.md, "Learning speed"); 0: the demonstrations alone
    max_episodes: int = 4000  # self_imitation: the replay's bound (the oldest of the policy's episodes leave first)
    words_lr: float = 1e-3  # a subtask head's learning rate: it learns its words by supervision (narration, a
    #                         coach's words, its replayed successes' words), not by PPO's gradient
    unsure: list[float] = field(default_factory=lambda: [0.3, 0.9])  # the detector's P(success) range [low, high)
    #                 in which its verdict counts neither way: the attempt sits out of its layout's comparison (no
    #                 advantage, not replayed). A lone approval among failures gets the largest advantage, and is
    #                 where the detector's false positives gather (bench/RESULTS.md, "Learning speed"). [0, 0]: every
    #                 verdict counts


@dataclasses.dataclass
class ResidualPPOConfig(LearnerConfig):
    """``learner=residual_ppo``: the VLA frozen, PPO trains a small residual head on its chunks."""

    algorithm: str = "residual_ppo"
    ppo_lr: float = 3e-4
    ppo_epochs: int = 8
    ppo_clip: float = 0.2
    ppo_minibatch: int = 256
    gamma: float = 0.95  # discount per decision
    gae_lambda: float = 0.95
    value_epochs: int = 20  # passes of the critic's refit per iteration


@dataclasses.dataclass
class CustomLearnerConfig(LearnerConfig):
    """``learner=my_lab.learners:Mine`` (an import path): a learner of a team's own, given ``options`` as its
    keyword arguments (``learner.options={steps:100}``)."""

    options: dict[str, Any] = field(default_factory=dict)


LEARNERS = {"filtered_bc": BCConfig, "imitation": ImitationConfig, "recap": RecapConfig, "ppo": PPOConfig,
            "residual_ppo": ResidualPPOConfig, "custom": CustomLearnerConfig}


@dataclasses.dataclass
class PlacementConfig:
    """Where the learner runs: in the driver's process, or as a Ray actor of its own (learner/remote.py) placed by
    the resources it asks for, and restarted from the deployed checkpoint if its process dies."""

    device: str = "auto"  # where it trains: auto (a GPU if its process sees one), cpu, cuda, cuda:N
    remote: bool = False  # a Ray actor of its own; false: in the driver's process
    cpus: float = 1.0  # remote: the CPUs it reserves (and its torch threads)
    gpus: float = 0.0  # remote: the GPUs it reserves, which puts it on a GPU node
    resources: dict[str, float] = field(default_factory=dict)  # remote: Ray custom resources that place it
    call_timeout_s: float = 3600.0  # remote: a call (an update) not answered within this restarts the learner


@dataclasses.dataclass
class RolloutConfig:
    use_ray: bool = True  # False runs the same workers in this process (debugging, tests)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    episodes_per_iteration: int = 0  # practice an update learns from; 0: the learner's choice (PRACTICE: ppo 128,
    #                                  the others 512)
    group_size: int = 0  # attempts per layout (seed) in one iteration: > 1 gives the learner a group baseline
    #                      (GRPO-style), and needs learner.practice_noise > 0 (filtered_bc, recap); 0: the learner's
    #                      choice (PRACTICE: ppo 4, the others 1)
    call_timeout_s: float = 600.0  # with Ray: an actor that does not answer a call within this is killed and
    #                                replaced (an environment that hangs); its episodes in flight are lost
    overlap: bool = False  # with Ray: collect the next iteration while the learner trains on this one (practice one
    #                        version behind the learner; the gate's evaluation waits for that collection)
    keep_collecting: float = 1.0  # with overlap: actors done with the next iteration's share before the learner's
    #                  update ends go on practising with the weights they hold, in rounds of 16 episodes, up to this
    #                  many times episodes_per_iteration more, rather than wait; the next iteration learns from all of
    #                  it (rollout/kept_collecting). 0: they wait
    trim_idle_s: Optional[float] = 5.0  # with Ray: an actor idle this long after a collection hands the memory it
    #                  freed back to the system (~1 GB down to ~420 MB); the next collection pages it in again (~12%
    #                  of its time), so a busy actor never trims. null: never (bench/actor_memory.py)
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources each actor needs, which
    #                     places it: {robot: 1} puts actors on nodes started with --resources='{"robot": N}'
    corrections: float = 0.0  # human corrections in practice, the scripted expert standing in for the person: the
    #                           share of episodes it takes over once they have run correct_after steps unfinished
    #                           and finishes (extras["intervention"]); recap and filtered_bc clone those steps as
    #                           demonstrations. 0: none. A robot host records its own teleoperation the same way
    correct_after: int = 16
    coaching: float = 0.0  # verbal coaching in practice (actors/coach.py), a scripted coach standing in for the
    #                        person: the share of episodes in which it corrects, in words, a policy with a subtask
    #                        head that names nothing left to do; learners take its words as the subtask the policy
    #                        should have been doing (extras["coaching"]). 0: none


@dataclasses.dataclass
class RayConfig:
    address: str = ""  # "": start Ray on this machine for the run; "auto" or HOST:PORT: join a running cluster
    #                    (`ray start --head` on one machine, `ray start --address=HOST:PORT` on the others)
    dashboard: bool = False  # a Ray the run starts serves its dashboard on 127.0.0.1:8265 (localhost only)


@dataclasses.dataclass
class EvalConfig:
    episodes: int = 500  # held-out seeds, the same ones at every evaluation
    every: int = 0  # evaluate every N iterations (and always at the start and the end); 0: every ~1,024 practice
    #                 episodes (2 iterations of 512, 8 of 128), so that evaluation stays a small share of the time
    noise: Optional[float] = 0.0  # the built-in flow VLA's starting noise in evaluation (and the gate's), the same
    #                               for every learner: 0, the flow from its mean, as the policy acts once deployed
    #                               and as filtered BC and PPO practise (each held-out seed then has one outcome,
    #                               and the gate's paired test sees no sampling noise); 1, a sample; None, as its
    #                               learner's snapshot asks (ppo: its mean; the others: a sample)
    judge: str = "ground_truth"  # who scores evaluations and the promotion gate: ground_truth (the simulator's
    #                              success) or detector (the detector labelling practice: an environment that cannot
    #                              judge itself, such as a robot; the gate then audits it, gate.audit)
    robust_episodes: int = 200  # the robustness split: held-out seeds (their own, the same at the start and the
    #                             end) evaluated under the randomisation below as well as in the nominal scene; 0 =
    #                             off. Only where the environment takes env.randomize (the tabletop)
    robust: RandomizeConfig = field(default_factory=lambda: RandomizeConfig(  # what a real scene varies that the
        colour=0.15, lighting=0.3, camera=0.05, size=0.2, friction=0.3))  # default training scene does not


@dataclasses.dataclass
class AuditConfig:
    """The audit in the loop (flywheel/audit.py): every iteration, ``sample`` labelled episodes checked against the
    simulator's ground truth (a human's labels on a robot)."""

    sample: int = 64  # 0 = no audit
    bound: float = 0.15  # |claimed - audited success| beyond which (with 95% confidence) the alarm fires
    retrain: bool = True  # on an alarm, retrain the detector on every trusted label (the audited ones included)
    retrain_every: int = 0  # > 0: every N iterations, train a candidate detector on every trusted label (audited
    #                         on-policy episodes included) and promote it if it judges the newest audit no worse


@dataclasses.dataclass
class GateConfig:
    """The promotion gate (flywheel/gate.py): each new version runs ``episodes`` held-out seeds (disjoint from the
    reported evaluation's) and is held back, the run rolling back to the deployed version, when it is worse with
    ``confidence`` by more than ``margin`` (paired, seed by seed).

    A candidate no worse than the deployed one is still held back about 1 - ``confidence`` of the time: over 240
    tests at 0.95, about 12 rollbacks by chance alone (8-21 in the 240-update runs, bench/RESULTS.md). Each costs the
    ``every`` updates since the last test. A higher ``confidence`` or a ``margin`` trades them for letting small
    regressions through."""

    episodes: int = 256  # 0 = no gate: every update goes straight to practice
    every: int = 0  # test every N-th update; those between go to practice untested, and a held-back candidate rolls
    #                 them back with it. 0: every ~512 practice episodes (each update of 512, every 4th of 128), so
    #                 that the test stays a small share of an update's time
    confidence: float = 0.95  # one-sided
    margin: float = 0.0  # success rate a candidate may lose before it counts as worse
    audit: int = 64  # eval.judge=detector: up to so many of the candidate's gate episodes that carry a trusted
    #                  verdict (a person's, as info['success'], on a robot) are checked against the detector's; a gap
    #                  beyond audit.bound (95%) holds the candidate back, whatever the detector rated it


@dataclasses.dataclass
class BudgetConfig:
    minutes: float = 15.0  # wall clock for the whole run, start-up and final evaluation included
    iterations: int = 0  # 0 = no limit
    env_steps: int = 0  # 0 = no limit
    episodes: int = 0  # practice episodes; 0 = no limit


@dataclasses.dataclass
class WandbConfig:
    mode: str = "auto"  # auto: online with WANDB_API_KEY set, offline otherwise; or online / offline / disabled
    project: str = "flywheel"


@dataclasses.dataclass
class RunConfig:
    """``flywheel run``: the self-improvement loop."""

    run_dir: str = "???"  # where everything of this run is written
    seed: int = 0
    experiment: str = "default"
    # The wrist camera is recorded for the detector (the shipped policy reads the overhead camera only): it sees
    # where a block came to rest, which the overhead camera resolves to under a pixel (bench/RESULTS.md, "The
    # detector's quality").
    env: EnvConfig = field(default_factory=lambda: EnvConfig(sensors=["overhead", "wrist"]))
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # learner=NAME chooses the algorithm (LEARNERS)
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # where the learner runs
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclasses.dataclass
class Pi0PretrainConfig:
    """The π0 that ``flywheel pretrain model=pi0`` starts from (flywheel/vla/pi0.py): openpi's variants, or
    flywheel's small ones, which learn on a CPU (about 3M parameters)."""

    paligemma_variant: str = "gemma_small"  # gemma_2b (π0's), gemma_small, dummy
    action_expert_variant: str = "gemma_small"  # gemma_300m (π0's), gemma_small, dummy
    vision_variant: str = "siglip_small"  # so400m (π0's, 224 px), siglip_small (64 px), siglip_dummy
    pi05: bool = False  # π0.5: adaRMS time conditioning, the state in the prompt
    action_horizon: int = 8  # actions per chunk
    max_token_len: int = 0  # prompt tokens; 0: 24 for π0, 48 for π0.5 (its prompt holds the state)
    vocab_size: int = 256  # the tokenizer trained on the tasks' instructions (PaliGemma's is 257,152)


@dataclasses.dataclass
class PretrainConfig:
    """``flywheel pretrain``: behaviour cloning of the small VLA (or a π0) on scripted demonstrations."""

    out_dir: str = "runs/pretrain"  # checkpoints, demos and metrics; the job resumes from here if started again
    model: str = "small_vla"  # small_vla (writes base_vla.safetensors) or pi0 (writes base_pi0/, openpi's file set,
    #                           which policy=pi0 policy.checkpoint=OUT_DIR/base_pi0 loads; shaped by pi0.*)
    pi0: Pi0PretrainConfig = field(default_factory=Pi0PretrainConfig)
    seed: int = 0
    demos: int = 100  # the limited demonstration set (the shipped base: 100)
    demos_from: str = ""  # a local LeRobotDataset v3.0 directory: its first `demos` episodes are the demonstrations,
    #                       read through demo_keys, instead of the scripted expert's; the base's record names it, and
    #                       a run's learner replays the same episodes
    demo_keys: DatasetKeys = field(default_factory=DatasetKeys)
    operators: list[str] = field(default_factory=lambda: ["standard"])  # whose demonstrations, taken in turn by
    #                      seed (actors/expert.py OPERATORS): the shipped base's are [standard, carrier]
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 500
    eval_every: int = 1000
    eval_episodes: int = 500
    checkpoint_every: int = 500
    action_head: str = "flow"  # "flow" (continuous chunks, pi0-style) or "tokens" (discrete bins, RT-2/OpenVLA-style)
    bins: int = 64  # action tokens: bins per action dimension over [-1, 1]
    init: str = ""  # small_vla: start from this checkpoint (base, base:NAME or a path) instead of from scratch: its
    #                 shape is kept, and the environment must fit it
    subtask_head: bool = False  # small_vla: add a π0.5-style subtask head, trained on the demonstrator's narration
    #                             (actors/tabletop.py subtasks); the low level learns to act on the narrated subtask
    export: str = ""  # also copy the final weights here (e.g. flywheel/assets/base_vla.safetensors)
    threads: int = 2  # torch intra-op threads: fixed, because the order of float sums (and so the weights) depends
    #                   on it. Two runs with the same seed and threads give the same base; BC success at equal loss
    #                   varies widely between runs that differ (0.41 and 0.25 were measured)
    env: EnvConfig = field(default_factory=EnvConfig)


@dataclasses.dataclass
class DemosConfig:
    """``flywheel demos``: scripted demonstrations into an episode store."""

    out_dir: str = "???"  # the episode store to append to (created if missing)
    episodes: int = 100
    split: str = "train"  # train | eval | holdout: which disjoint seed range (actors/tabletop.py split_seed)
    first: int = 0  # index of the first seed in that range
    noise: float = 0.1  # the expert's motion noise
    operators: list[str] = field(default_factory=lambda: ["standard"])  # whose demonstrations, taken in turn by
    #                      seed (actors/expert.py OPERATORS)
    env: EnvConfig = field(default_factory=EnvConfig)


@dataclasses.dataclass
class ServeEvalConfig:
    noise: Optional[float] = 0.0  # the flow's starting noise where an observation brings none, as eval.noise of
    #                               `flywheel run`: 0, from its mean (one deterministic chunk per observation); 1, a
    #                               sample; None, as the checkpoint's learner asked


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 serves every interface (then give an API key)
    port: int = 8000  # openpi's default; 0 takes a free port and prints it
    api_key: str = ""  # clients must send the header `Authorization: Api-Key <key>`; "": none. The FLYWHEEL_API_KEY
    #                    environment variable sets it too, without showing it in the process list


@dataclasses.dataclass
class ServeConfig:
    """``flywheel serve``: a policy over the network in openpi's websocket protocol (flywheel/serve.py)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    eval: ServeEvalConfig = field(default_factory=ServeEvalConfig)
    serve: ServerConfig = field(default_factory=ServerConfig)


@dataclasses.dataclass
class RobotConfig:
    driver: str = "sim"  # the robot plug-in: sim (the tabletop as a robot), or an import path module:factory
    #                      returning an actors.robot.Robot driver (a LeRobot arm's adapter, your own)
    family: str = "button"  # sim: the tabletop task it sets up at each reset
    image_size: int = 64
    sensors: list[str] = field(default_factory=lambda: ["overhead"])  # the cameras it sends
    rate_hz: float = 50.0  # sim: its physics clock
    watchdog_s: float = 0.5  # hold the robot still when no command arrives within this


@dataclasses.dataclass
class RobotHostConfig:
    """``flywheel robot-host``: one robot served to a rollout actor over the network (actors/robot_host.py)."""

    robot: RobotConfig = field(default_factory=RobotConfig)
    serve: ServerConfig = field(default_factory=lambda: ServerConfig(port=8780))


@dataclasses.dataclass
class PageConfig:
    """``flywheel page``: the web page for the people at the robots (flywheel/page.py)."""

    run_dir: str = "???"  # the run whose episodes the people judge (its episode store)
    robots: dict[str, str] = field(default_factory=dict)  # name -> robot host URL (ws://host:8780), for the live view,
    #                       e-stop, "scene is reset", live verdicts and takeover: robots={arm1:'ws://10.0.0.5:8780'}
    api_key: str = ""  # the robot hosts' API key, where they have one (or FLYWHEEL_API_KEY)
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 serves every interface (then give a token)
    port: int = 8790
    token: str = ""  # required from any address other than loopback (?token=...); or FLYWHEEL_PAGE_TOKEN


@dataclasses.dataclass
class ExportConfig:
    """``flywheel data export``: a run's episodes (or a part of them) into a LeRobotDataset v3.0, appending."""

    run_dir: str = "???"  # a run's directory (its episodes/ store), or an episode store itself
    out: str = "???"  # the dataset directory: created, or appended to (episodes already in it are skipped)
    split: Optional[str] = None  # train | eval | holdout; null: all
    versions: Optional[list[int]] = None  # policy versions to take (-1: the scripted expert); null: all
    label: Optional[str] = None  # success | failure, by the newest label; null: all
    human_only: bool = False  # only episodes a person judged
    corrected_only: bool = False  # only episodes in which a person took over
    fps: int = 10  # the control rate the episodes were recorded at (the tabletop's: 10); an existing dataset's wins
    robot_type: str = "flywheel-tabletop"
    pix_fmt: str = "yuv444p"  # video: yuv444p with crf 0 is lossless in colour; yuv420p crf 23 for a real camera
    crf: int = 0


@dataclasses.dataclass
class ImportConfig:
    """``flywheel data import``: a local LeRobotDataset v3.0 into an episode store (for a detector to judge or train
    on; `flywheel pretrain demos_from=` reads a dataset directly)."""

    dataset: str = "???"  # the dataset directory
    store: str = "???"  # the episode store to append to (created if missing); episodes already there are skipped
    split: str = "train"  # for episodes that do not carry flywheel's own split
    demos: bool = False  # mark each unlabelled episode a demonstration (a "demo" label)
    dataset_keys: DatasetKeys = field(default_factory=DatasetKeys)  # which features are the camera, state, action


@dataclasses.dataclass
class RelabelConfig:
    """``flywheel reward relabel``: a detector judges every episode of a store (or of a dataset, imported into the
    store first); its labels are added, no episode is rewritten."""

    detector: str = "???"  # a detector checkpoint (.safetensors; `flywheel reward train` writes one)
    store: str = "???"  # a run's directory or an episode store
    dataset: str = ""  # a LeRobot dataset to import into `store` first
    dataset_keys: DatasetKeys = field(default_factory=DatasetKeys)  # which of its features are camera, state, action
    batch: int = 64  # episodes scored at once


_SCHEMAS = {"run": ("run_schema", RunConfig), "pretrain": ("pretrain_schema", PretrainConfig),
            "demos": ("demos_schema", DemosConfig), "serve": ("serve_schema", ServeConfig),
            "robot_host": ("robot_host_schema", RobotHostConfig), "page": ("page_schema", PageConfig),
            "data_export": ("data_export_schema", ExportConfig), "data_import": ("data_import_schema", ImportConfig),
            "relabel": ("relabel_schema", RelabelConfig)}


COMMANDS = {"robot_host": "robot-host", "data_export": "data export", "data_import": "data import",
            "relabel": "reward relabel"}  # the command of each schema whose name is not its command's


def _register() -> None:
    cs = ConfigStore.instance()
    for name, schema in _SCHEMAS.values():
        cs.store(name=name, node=schema)
    for name, schema in LEARNERS.items():
        cs.store(group="learner", name=name, node=schema)


class ConfigError(ValueError):
    """A config that does not compose: an unknown key, a wrong type, a missing value."""


def _near(name: str, key: str | None) -> str:
    """"Did you mean ...?" for a key the schema lacks: its known keys spelt most like it."""
    if not key:
        return ""

    def dotted(tree: Any, prefix: str = "") -> list[str]:
        return [k for name_, v in tree.items() for k in
                (dotted(v, f"{prefix}{name_}.") if isinstance(v, dict) and v else [f"{prefix}{name_}"])]

    known = dotted(OmegaConf.to_container(OmegaConf.structured(_SCHEMAS[name][1])))
    near = difflib.get_close_matches(str(key), known, n=3, cutoff=0.75)
    return f"Did you mean {' or '.join(near)}? " if near else ""


# How each learner practises where rollout.episodes_per_iteration / rollout.group_size are left at 0: (episodes an
# update, attempts a layout). PPO compares 4 attempts at each layout, and small iterations (more updates a minute)
# learned fastest on the wall clock (bench/RESULTS.md, "Learning speed"); the others clone one attempt a layout.
PRACTICE = {"ppo": (128, 4)}
PRACTICE_OTHERWISE = (512, 1)
EVAL_EPISODES = 1024  # practice episodes between evaluations where eval.every is left at 0
GATE_EPISODES = 512  # practice episodes between the gate's tests where gate.every is left at 0


def _practice_of_the_learner(cfg: DictConfig) -> None:
    episodes, group = PRACTICE.get(cfg.learner.algorithm, PRACTICE_OTHERWISE)
    if cfg.rollout.episodes_per_iteration == 0:
        cfg.rollout.episodes_per_iteration = episodes
    if cfg.rollout.group_size == 0:
        cfg.rollout.group_size = group
    if cfg.eval.every == 0:
        cfg.eval.every = max(1, round(EVAL_EPISODES / cfg.rollout.episodes_per_iteration))
    if cfg.gate.every == 0:
        cfg.gate.every = max(1, round(GATE_EPISODES / cfg.rollout.episodes_per_iteration))


def load_config(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with command-line overrides (``key=value``), checked against the schema."""
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="configs", version_base=None):
            cfg = compose(config_name=name, overrides=_dicts_replaced(name, _parts_chosen(name, overrides)))
    except (ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as e:
        cause = e.__cause__ or e
        _not_the_algorithms(cause)
        raise ConfigError(
            f"bad config for `flywheel {COMMANDS.get(name, name)}`: {cause}\n"
            f"{_near(name, getattr(cause, 'full_key', None))}"
            f"Valid keys are those of {_SCHEMAS[name][1].__name__} in flywheel/config.py; "
            f"`flywheel {COMMANDS.get(name, name)} --help` lists them with their defaults."
        ) from e
    finally:
        GlobalHydra.instance().clear()
    for keys, fits, why in _BOUNDS.get(name, ()):
        for key in keys:
            if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT and not fits(OmegaConf.select(cfg, key)):
                default = OmegaConf.select(OmegaConf.structured(_SCHEMAS[name][1]), key)
                raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: {why} (the default is {default})")
    if name == "run" and set(cfg.detector.sensors) - set(cfg.env.sensors):
        raise ConfigError(f"detector.sensors={list(cfg.detector.sensors)} but env.sensors={list(cfg.env.sensors)} does "
                          f"not record {sorted(set(cfg.detector.sensors) - set(cfg.env.sensors))}: add them to "
                          f"env.sensors (the episodes must carry every camera the detector judges from)")
    if name == "run":
        _practice_of_the_learner(cfg)
        _check_named_parts(cfg)
    if name == "serve":
        _check_named_parts(cfg, (("policy", "policy.name"),))
    shipped = name == "run" and (cfg.detector.checkpoint in ("auto", "base") or
                                 cfg.detector.checkpoint.startswith("base:"))
    if name == "run" and cfg.detector.checkpoint and not shipped and not Path(cfg.detector.checkpoint).is_file():
        raise ConfigError(f"detector.checkpoint={cfg.detector.checkpoint}: no such file. Give a detector's "
                          f".safetensors (`flywheel reward train` writes RUN_DIR/detector/detector-N.safetensors), base "
                          f"(the one shipped for the shipped base), or leave it empty to train one")
    if name == "run" and cfg.learner.get("credit") == "chunk" and cfg.learner.positive_fraction <= 0:
        raise ConfigError("learner.credit=chunk marks the top share of each task's chunks positive: give it "
                          "learner.positive_fraction in (0, 1), e.g. 0.3")
    from actors.expert import OPERATORS

    if name in ("pretrain", "demos") and (not cfg.operators or set(cfg.operators) - set(OPERATORS)):
        raise ConfigError(f"operators={list(cfg.operators)}: each must be one of {list(OPERATORS)} (actors/expert.py), "
                          f"and at least one given; e.g. operators=[standard,carrier]")
    return cfg


def _check_named_parts(cfg: DictConfig, parts: tuple[tuple[str, str], ...] = (
        ("policy", "policy.name"), ("env", "env.name"), ("detector", "detector.name"),
        ("learner", "learner.algorithm"))) -> None:
    """Each plug-in the config names is registered or an import path (imported only when the run starts)."""
    from flywheel import plugins

    for kind, key in parts:
        spec = OmegaConf.select(cfg, key)
        if spec not in plugins.registered(kind) and not plugins.is_import_path(spec):
            raise ConfigError(f"{key}={spec!r} is unknown: choose one of {plugins.registered(kind)}, or give an import "
                              f"path module:factory (README, \"Bring your own\")")


_ABSENT = object()


def run_schema(learner: dict[str, Any] | None = None) -> DictConfig:
    """RunConfig's schema with the learner node of the algorithm whose keys ``learner`` (a recorded config's) has."""
    shared = {f.name for f in dataclasses.fields(LearnerConfig)}  # (a config recorded before a shared key was added
    keys = set(learner or {}) - shared                          # lacks it: the algorithms differ by their own keys)
    chosen = next((c for c in LEARNERS.values() if {f.name for f in dataclasses.fields(c)} - shared == keys),
                  LearnerConfig)
    return OmegaConf.merge(OmegaConf.structured(RunConfig), {"learner": OmegaConf.structured(chosen)})


def learner_groups() -> list[str]:
    """The choices of ``learner=``: each algorithm's own keys (LEARNERS), and the presets' tuned variants of them
    (configs/learner/*.yaml)."""
    import configs

    return sorted({*LEARNERS, *(p.stem for p in (Path(configs.__file__).parent / "learner").glob("*.yaml"))})


def _parts_chosen(name: str, overrides: list[str]) -> list[str]:
    """``policy=my_lab.vla:make_policy`` (and ``env=``, ``detector=``) names a plug-in: the part's ``name`` key.
    ``learner=NAME`` chooses an algorithm's config group, as does ``learner.algorithm=NAME`` for one that has a
    group; a learner of a team's own (``learner=my_lab.learners:Mine``) takes ``learner=custom``'s keys."""
    out = []
    sections = {k for k in ("policy", "env", "detector") if isinstance(OmegaConf.structured(_SCHEMAS[name][1]).get(k),
                                                                       DictConfig)}  # (relabel's detector is a file)
    for override in overrides:
        key, eq, value = override.partition("=")
        if eq and key in sections and not value.startswith("{"):
            out.append(f"{key}.name={value}")
        elif eq and key in ("learner", "learner.algorithm") and value in learner_groups():
            out.append(f"learner={value}")
        elif eq and key == "learner":
            out += ["learner=custom", f"learner.algorithm={value}"]
        else:
            out.append(override)
    return out


def _not_the_algorithms(cause: BaseException) -> None:
    """A learner key the chosen algorithm does not take: a ConfigError naming the keys it does."""
    key, schema = getattr(cause, "full_key", None) or "", getattr(cause, "object_type", None)
    if key.startswith("learner.") and dataclasses.is_dataclass(schema) and issubclass(schema, LearnerConfig):
        algorithm = next((n for n, c in LEARNERS.items() if c is schema), schema.__name__)
        keys = sorted(f.name for f in dataclasses.fields(schema) if f.name != "algorithm")
        raise ConfigError(f"{key} is not a key of learner={algorithm}: it takes {', '.join(keys)} (choose the "
                          f"algorithm first, e.g. learner=ppo learner.ppo_lr=1e-4; `flywheel run learner={algorithm} "
                          f"--help` lists them with their defaults)") from cause


def _dicts_replaced(name: str, overrides: list[str]) -> list[str]:
    """``rollout.resources={robot:1}`` replaces a dict-valued key whole; Hydra would refuse its new keys ("not in
    struct") without a ``++`` in front, which nobody should have to know."""
    schema = OmegaConf.structured(_SCHEMAS[name][1])
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        node = OmegaConf.select(schema, key) if "=" in o and not key.startswith(("+", "~")) else None
        if (isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict) or \
                key.startswith(("learner.options", "policy.options", "env.options")):
            o = "++" + o  # a dict, not a section
        out.append(o)
    return out


# Values a key can take and still mean something: (keys, test, why not), checked once the config has composed.
_BOUNDS = {"run": (
    (("detector.ensemble", "detector.window", "detector.stride", "detector.swaps"), lambda v: v >= 1,
     "it counts frames, steps or models, so it must be at least 1"),
    (("detector.steps",), lambda v: v >= 3, "the detector's optimiser steps; its one-cycle schedule needs a warm-up "
                                           "and a decay, so at least 3"),
    (("detector.threshold", "detector.target_precision"), lambda v: 0 <= v <= 1,
     "it is a probability or a precision, so it must lie in [0, 1]"),
    (("budget.minutes",), lambda v: v > 0, "the run's wall clock, so it must be more than 0 (a night: 480)"),
    (("eval.noise",), lambda v: v is None or v >= 0, "it scales the flow's starting noise in evaluation, so it must "
                                                    "be at least 0 (0: the flow from its mean), or null"),
    (("eval.judge",), lambda v: v in ("ground_truth", "detector"), "choose ground_truth (the simulator's success) "
                                                                   "or detector (an environment that cannot judge "
                                                                   "itself, such as a robot)"),
    (("gate.audit",), lambda v: v >= 0, "a number of gate episodes, so it must be at least 0 (0: no audit)"),
    (("gate.every", "eval.every"), lambda v: v >= 0, "a number of updates, so it must be at least 0 (0: the "
                                                     "default schedule)"),
    (("rollout.corrections", "rollout.coaching"), lambda v: 0 <= v <= 1, "a share of practice episodes, so it "
                                                                         "must lie in [0, 1] (0: none)"),
    (("rollout.trim_idle_s",), lambda v: v is None or v >= 0, "seconds an idle actor waits before it hands its "
                                                            "memory back, so it must be at least 0, or null (never)"),
    (("rollout.correct_after",), lambda v: v >= 1, "the steps a practice episode runs before a person may take "
                                                   "over, so it must be at least 1"),
    (("learner.clone",), lambda v: v in ("chunks", "executed"), "choose executed (clone what the policy did at every "
                                                                 "step) or chunks (the chunks it sampled)"),
    (("learner.practice_noise",), lambda v: v >= 0, "it scales the flow's starting noise, so it must be at least 0"),
    (("learner.ema",), lambda v: 0 <= v < 1, "a moving average's decay per step, so it must lie in [0, 1) (0: off)"),
    (("learner.flow_noise",), lambda v: v > 0, "the std of each flow step's draw in PPO's practice, which gives a "
                                               "chunk its log-probability, so it must be more than 0"),
    (("learner.noise_at",), lambda v: v in ("steps", "output"), "choose steps (each Euler step of the flow draws) "
                                                                 "or output (only its chunk draws)"),
    (("learner.advantage",), lambda v: v in ("group", "gae"), "choose group (GRPO over rollout.group_size attempts "
                                                              "a layout) or gae (a critic)"),
    (("learner.credit",), lambda v: v in ("episode", "chunk"), "choose episode (RECAP credits a whole episode "
                                                               "against the value of its start) or chunk"),
    (("learner.positive_fraction",), lambda v: 0 <= v < 1, "RECAP's share of positives: 0 (advantage above zero) "
                                                           "or a fraction in (0, 1)"),
)}


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
