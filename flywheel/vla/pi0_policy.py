"""π0 / π0.5 as flywheel's ``TrainablePolicy`` (flywheel/contracts.py): flywheel's observations in, through the
checkpoint's tokenizer and normalisation statistics, and actions out in the environment's [-1, 1].

What it offers the learners (``capabilities``):
- imitation (filtered BC): openpi's flow-matching loss on the action chunk;
- "indicator" (RECAP): an advantage embedding added to every action token (``Pi0.flywheel_indicator``);
- "log_prob" (PPO): flow-noise sampling, x_{k+1} ~ N(x_k - v(x_k, t_k)/K, sigma^2) at each of the K Euler steps
  (or only at the chunk, ``noise_at="output"``), whose exact log-probability it recomputes under new weights.

The learners' context ``ctx`` is the packed prefix (``Prefix.pack``: every backbone layer's keys and values, which
tokens are real, the state), so that the action expert trains and is scored with the backbone frozen or not;
``features`` (for value heads) is the backbone's output averaged over the real prefix tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

from flywheel.vla.model import Draw, NumpyWeights
from flywheel.vla.pi0 import Pi0, Pi0Config, Prefix

SLOTS = {"overhead": 0, "wrist": 1}  # flywheel's cameras -> openpi's image slots (base, left wrist)


class PromptTokenizer:
    """PaliGemma's SentencePiece tokenizer from a local file, prompts formatted as openpi formats them: π0's
    "<bos>TASK\\n"; π0.5's "<bos>Task: TASK, State: s1 s2 ...;\\nAction: " with the state in 256 bins. Padded with 0
    (PaliGemma's <pad>) to ``max_len``."""

    def __init__(self, path: str | Path, max_len: int):
        import sentencepiece

        self.path, self.max_len = str(path), max_len
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)

    def __getstate__(self):  # Ray pickles the policy's parts: the file's path travels, not the C++ object
        return {"path": self.path, "max_len": self.max_len}

    def __setstate__(self, state):
        self.__init__(state["path"], state["max_len"])

    @staticmethod
    def clean(text: str) -> str:
        return text.strip().replace("_", " ").replace("\n", " ")

    def encode(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        if state is None:
            return self.sp.encode(self.clean(prompt), add_bos=True) + self.sp.encode("\n")
        bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
        return self.sp.encode(f"Task: {self.clean(prompt)}, State: {' '.join(map(str, bins))};\nAction: ",
                              add_bos=True)

    def pad(self, rows: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(rows), self.max_len), np.int64)
        for i, row in enumerate(rows):
            out[i, :min(len(row), self.max_len)] = row[:self.max_len]
        return out

    def decode(self, ids: np.ndarray) -> str:
        return self.sp.decode([int(i) for i in ids if i > 0])


class Normalizer:
    """openpi's normalisation: z-scores for π0, the 1%/99% quantiles mapped to [-1, 1] for π0.5; the identity
    where a checkpoint has no statistics for a key."""

    def __init__(self, stats: dict[str, dict[str, np.ndarray]], quantile: bool):
        self.stats, self.quantile = stats, quantile

    def _bounds(self, key: str, dims: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.stats.get(key)
        if not entry:
            return None
        lo, hi = (entry["q01"], entry["q99"]) if self.quantile else (entry["mean"], entry["std"])
        if len(lo) < dims:
            raise ValueError(f"the checkpoint's {key} statistics have {len(lo)} dims, the data {dims}: they come from "
                             f"another robot (policy.asset_id names which)")
        as_t = lambda a: torch.as_tensor(np.asarray(a[:dims], np.float32), device=device)  # noqa: E731
        return as_t(lo), as_t(hi)

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        b = self._bounds(key, x.shape[-1], x.device)
        if b is None:
            return x
        if self.quantile:
            return (x - b[0]) / (b[1] - b[0] + 1e-6) * 2.0 - 1.0
        return (x - b[0]) / (b[1] + 1e-6)

    def inverse(self, key: str, x: torch.Tensor) -> torch.Tensor:
        b = self._bounds(key, x.shape[-1], x.device)
        if b is None:
            return x
        if self.quantile:
            return (x + 1.0) / 2.0 * (b[1] - b[0] + 1e-6) + b[0]
        return x * (b[1] + 1e-6) + b[0]


def fit_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """openpi's statistics of vectors (N, D): mean, std and the 1%/99% quantiles."""
    values = np.asarray(values, np.float64)
    return {"mean": values.mean(0), "std": values.std(0), "q01": np.quantile(values, 0.01, axis=0),
            "q99": np.quantile(values, 0.99, axis=0)}


@dataclasses.dataclass
class Pi0Spec:
    """Everything but the weights that builds a ``Pi0Policy``: small and picklable (Ray sends it to the actors)."""

    cfg: Pi0Config
    tokenizer: str
    norm_stats: dict[str, dict[str, np.ndarray]]
    sensors: tuple[str, ...] = ("overhead",)
    action_dim: int = 3  # the environment's: the first dims of the model's (padded) action_dim
    # What fits a single GPU (README, "What one GPU can fine-tune"):
    vlm: str = "train"  # the vision-language model: train (full fine-tuning), frozen (the action expert and its
    #                     projections train), lora (frozen, with low-rank adapters on the language model's layers)
    lora_rank: int = 16
    gradient_checkpointing: bool = False  # recompute each layer in the backward pass rather than keep activations
    autocast: bool = True  # bfloat16 autocast where the model runs on CUDA (float32 on a CPU, where bf16 is slow)

    def __post_init__(self):
        if self.vlm not in ("train", "frozen", "lora"):
            raise ValueError(f"vlm={self.vlm!r}: choose train, frozen or lora")
        if self.vlm == "lora" and self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank}: at least 1")


class Pi0Policy(NumpyWeights, Pi0):
    """A ``Pi0`` (openpi's parameter names, so ``get_weights`` is a checkpoint's ``model.safetensors``) that speaks
    flywheel's ``TrainablePolicy``."""

    action_head = "flow"
    capabilities = frozenset({"log_prob", "indicator"})

    def __init__(self, spec: Pi0Spec):
        super().__init__(spec.cfg)
        unknown = [s for s in spec.sensors if s != "touch" and SLOTS.get(s, 99) >= spec.cfg.image_slots]
        if unknown:
            raise ValueError(f"this π0 reads the RGB cameras {[s for s, i in SLOTS.items() if i < spec.cfg.image_slots]}"
                             f" (and touch, as state): not {unknown}")
        if spec.action_dim > spec.cfg.action_dim:
            raise ValueError(f"the environment acts in {spec.action_dim} dims, the π0 checkpoint in "
                             f"{spec.cfg.action_dim}")
        self.spec = spec
        self.tokenizer = PromptTokenizer(spec.tokenizer, spec.cfg.max_token_len)
        self.normalizer = Normalizer(spec.norm_stats, quantile=spec.cfg.pi05)
        self.gradient_checkpointing = spec.gradient_checkpointing
        trains(self, spec.vlm, spec.lora_rank)

    def _autocast(self):
        """bfloat16 autocast on CUDA (``Pi0Spec.autocast``); nothing elsewhere."""
        on = self.spec.autocast and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    # ---- the TrainablePolicy contract --------------------------------------------------------------------------

    @property
    def chunk(self) -> int:
        return self.cfg.action_horizon

    @property
    def action_dim(self) -> int:
        return self.spec.action_dim

    @property
    def sensors(self) -> tuple[str, ...]:
        return tuple(self.spec.sensors)

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    @property
    def feature_dim(self) -> int:
        return self.cfg.vlm.width

    @property
    def noise_shape(self) -> tuple[int, int]:
        """The flow's starting noise per observation: the model's padded action width, not the robot's."""
        return self.cfg.action_horizon, self.cfg.action_dim

    def token_ids(self, instructions: list[str]) -> np.ndarray:
        """int64 (B, max_token_len): π0's whole prompt; π0.5's instruction alone (its prompt holds the state, which
        ``context`` adds)."""
        if self.cfg.pi05:
            return self.tokenizer.pad([self.tokenizer.sp.encode(self.tokenizer.clean(t)) for t in instructions])
        return self.tokenizer.pad([self.tokenizer.encode(t) for t in instructions])

    def _inputs(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor):
        """flywheel's (uint8 (B, H, W, 3 per camera), ids, proprio) -> ``Pi0.prefix``'s arguments."""
        b, s = images.shape[0], self.cfg.vision.image
        pixels = images.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        cams = torch.full((b, self.cfg.image_slots, 3, s, s), -1.0, device=self.device)
        valid = torch.zeros(b, self.cfg.image_slots, dtype=torch.bool, device=self.device)
        for i, sensor in enumerate(x for x in self.spec.sensors if x in SLOTS):
            cams[:, SLOTS[sensor]] = resize_with_pad(pixels[:, 3 * i:3 * i + 3], s)
            valid[:, SLOTS[sensor]] = True
        state = self.normalizer.forward("state", proprio.to(self.device).float())
        state = F.pad(state, (0, self.cfg.action_dim - state.shape[-1]))
        if self.cfg.pi05:  # the state, in bins, into the prompt
            rows = [self.tokenizer.encode(self.tokenizer.decode(r), s.numpy())
                    for r, s in zip(ids.cpu().numpy(), state.detach().cpu())]
            ids = torch.from_numpy(self.tokenizer.pad(rows))
        ids = ids.to(self.device)
        return cams, valid, ids, ids > 0, state

    def context(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """The packed prefix (B, D), with gradients (``Prefix.pack``)."""
        with self._autocast():
            return self.prefix(*self._inputs(images, ids, proprio))[0].pack()

    @torch.no_grad()
    def features(self, images: np.ndarray, ids: np.ndarray, proprio: np.ndarray, batch: int = 64) -> torch.Tensor:
        """The backbone's output averaged over the real prefix tokens (B, width), in batches, without gradients."""
        out = []
        for i in range(0, len(images), batch):
            args = self._inputs(*(torch.from_numpy(np.asarray(a[i:i + batch])) for a in (images, ids, proprio)))
            with self._autocast():
                prefix, hidden = self.prefix(*args)
            hidden = hidden.float()
            keep = prefix.valid.float()[..., None]
            out.append((hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0))
        return torch.cat(out)

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        """The VLM (vision tower, projector, language model): frozen when a learner trains the action expert."""
        return list(self.paligemma_with_expert.paligemma.parameters())

    def conditioning_parameters(self) -> list[torch.nn.Parameter]:
        return [self.flywheel_indicator.weight]

    @torch.no_grad()
    def start_conditioning(self) -> None:
        """"Positive" and "negative" start as "none" where the checkpoint never learned them."""
        rows = self.flywheel_indicator.weight
        if not rows[1:].any():
            rows[1:] = rows[0]

    def _targets(self, actions: torch.Tensor) -> torch.Tensor:
        """Environment chunks (B, C, A) -> the model's normalised, padded ones (B, C, action_dim)."""
        x = self.normalizer.forward("actions", actions.to(self.device).float())
        return F.pad(x, (0, self.cfg.action_dim - x.shape[-1]))

    def imitation_loss(self, ctx: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor | None = None,
                       indicator: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """openpi's flow matching: x_t = t noise + (1 - t) actions with t ~ Beta(1.5, 1) (drawn by inverting its
        CDF, t = u^(1/1.5), so that ``generator`` draws it), regressing u = noise - actions; averaged over the
        environment's action dims (the padding is free)."""
        target = self._targets(actions)
        b = target.shape[0]
        noise = torch.randn(target.shape, generator=generator).to(target.device)
        u = torch.rand(b, generator=generator).to(target.device)
        t = u.pow(1.0 / 1.5) * 0.999 + 0.001
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * target
        with self._autocast():
            v = self.velocity(Prefix.unpack(ctx, self.cfg), x_t, t, indicator)
        per_sample = (v - (noise - target))[..., :self.action_dim].pow(2).mean(dim=(1, 2))
        if weights is None:
            return per_sample.mean()
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)

    def _integrate(self, prefix: Prefix, start: torch.Tensor, indicator: int, guidance: float, step_noise: float,
                   generator: torch.Generator | None) -> list[torch.Tensor]:
        """Euler steps from noise (t=1) to actions (t=0), with classifier-free guidance on the indicator and, with
        ``step_noise``, a Gaussian draw at each step: the chain of states (K+1 of them)."""
        steps, b = self.cfg.flow_steps, start.shape[0]
        cond = torch.full((b,), indicator, dtype=torch.long, device=start.device)
        chain = [start]
        for k in range(steps):
            t = torch.full((b,), 1.0 - k / steps, device=start.device)
            with self._autocast():
                v = self.velocity(prefix, chain[-1], t, cond)
                if guidance != 1.0:
                    free = self.velocity(prefix, chain[-1], t, torch.zeros_like(cond))
                    v = free + guidance * (v - free)
            x = chain[-1] - v / steps
            if step_noise > 0:
                x = x + step_noise * torch.randn(x.shape, generator=generator).to(x.device)
            chain.append(x)
        return chain

    @torch.no_grad()
    def sample(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor,
               generator: torch.Generator | None = None, extras: dict | None = None, **how) -> torch.Tensor:
        """An action chunk (B, C, A) in [-1, 1], drawn as ``how`` (``Draw``'s fields) says, as ``SmallVLA.sample``
        documents; no residual head, and ``greedy`` means nothing to a flow."""
        d = Draw(**how)
        if d.residual != "off":
            raise ValueError("π0 has no residual head: residual_ppo needs flywheel's small VLA")
        with self._autocast():
            prefix = self.prefix(*self._inputs(images, ids, proprio))[0]
        shape = (images.shape[0], self.cfg.action_horizon, self.cfg.action_dim)
        start = d.start if d.start is not None else \
            d.noise * torch.randn(shape, generator=generator) if d.noise else torch.zeros(shape)
        flow_noise = d.flow_noise
        chain = self._integrate(prefix, start.to(self.device).float(), d.indicator, d.guidance,
                                flow_noise if d.noise_at == "steps" else 0.0, generator)
        x = chain[-1]
        if flow_noise > 0 and d.noise_at == "output":
            mean, x = x, x + flow_noise * torch.randn(x.shape, generator=generator).to(x.device)
            if extras is not None:
                extras.update(drawn=x, logp=torch.distributions.Normal(mean, flow_noise).log_prob(x))
        elif flow_noise > 0 and extras is not None:
            stacked = torch.stack(chain, dim=1)
            extras.update(flow_chain=stacked, logp=self._chain_log_prob(prefix, stacked, flow_noise))
        if extras is not None:
            extras.update({k: v.cpu() for k, v in extras.items()})
        actions = self.normalizer.inverse("actions", x[..., :self.action_dim])
        return actions.clamp(-1.0, 1.0).cpu()

    def _chain_log_prob(self, prefix: Prefix, chain: torch.Tensor, flow_noise: float) -> torch.Tensor:
        """log N(x_{k+1}; x_k - v(x_k, t_k)/K, sigma^2) of each step of recorded chains (B, K+1, C, D) ->
        (B, K, C, D), every step of every chain in one pass of the expert."""
        b, steps = chain.shape[0], chain.shape[1] - 1
        x = chain[:, :-1].flatten(0, 1)
        t = (1.0 - torch.arange(steps, device=x.device, dtype=x.dtype) / steps).repeat(b)
        repeated = Prefix([k.repeat_interleave(steps, 0) for k in prefix.keys],
                          [v.repeat_interleave(steps, 0) for v in prefix.values],
                          prefix.valid.repeat_interleave(steps, 0), prefix.state.repeat_interleave(steps, 0))
        with self._autocast():
            velocity = self.velocity(repeated, x, t)
        mean = x - velocity / steps
        return torch.distributions.Normal(mean, flow_noise).log_prob(chain[:, 1:].flatten(0, 1)).view_as(chain[:, 1:])

    def log_prob(self, ctx: torch.Tensor, recorded: dict[str, torch.Tensor], flow_noise: float = 0.0) -> torch.Tensor:
        """The exact log-probability under these weights of what a practice draw recorded (unconditioned): the flow
        chain's steps (B, K, C, D), or the chunk drawn around the flow from zero noise (B, C, D)."""
        if flow_noise <= 0:
            raise ValueError("π0's chunk has a log-probability only when sampled with flow_noise > 0")
        prefix = Prefix.unpack(ctx, self.cfg)
        if "drawn" in recorded:
            start = torch.zeros_like(recorded["drawn"])
            mean = self._integrate(prefix, start, 0, 1.0, 0.0, None)[-1]
            return torch.distributions.Normal(mean, flow_noise).log_prob(recorded["drawn"])
        return self._chain_log_prob(prefix, recorded["flow_chain"].to(ctx.device), flow_noise)

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Every weight; a checkpoint without adapters (openpi's) starts them afresh (their product at zero)."""
        missing, unexpected = self.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
                                                   strict=False)
        if unexpected or any(".lora_" not in k for k in missing):
            raise KeyError(f"weights that do not fit this π0: missing {missing[:3]}, unexpected {unexpected[:3]}")


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trained low-rank update, W x + (alpha / r) B A x (Hu et al. 2021). ``weight``
    keeps its name (and so openpi's); ``merged`` folds the update in for a checkpoint openpi can read."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.weight = base.weight
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) / rank ** 0.5)
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))  # zero: starts as the base
        self.scale = (alpha or rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> torch.Tensor:
        return self.weight + self.scale * self.lora_b @ self.lora_a


def trains(model: Pi0, vlm: str, rank: int) -> None:
    """What of ``model`` trains (``Pi0Spec.vlm``): everything; the action expert and its projections alone; or those
    and low-rank adapters on the frozen language model."""
    if vlm != "train":
        model.paligemma_with_expert.paligemma.requires_grad_(False)
    if vlm == "lora":
        add_lora(model.paligemma_with_expert.paligemma.model.language_model, rank)


def add_lora(language_model: torch.nn.Module, rank: int) -> None:
    """Low-rank adapters on every attention and MLP projection of the language model (openpi's gemma_2b_lora: rank
    16, attention and feed-forward)."""
    for layer in language_model.layers:
        for part, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                            (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(part, name, LoRALinear(getattr(part, name), rank))


def resize_with_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> (B, 3, size, size): scaled to fit, aspect kept, padded with black (-1), as
    openpi resizes every camera."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(out, (left, size - nw - left, top, size - nh - top), value=-1.0)


def train_tokenizer(texts: list[str], path: str | Path, vocab_size: int = 200) -> Path:
    """A small SentencePiece model of ``texts`` with PaliGemma's special ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>):
    for a π0 trained from scratch on flywheel's own tasks, where PaliGemma's 257k-token vocabulary would be most of
    the model."""
    import io

    import sentencepiece

    lines = sorted({PromptTokenizer.clean(t) for t in texts} | {"Task: , State: ;", "Action:", *map(str, range(256))})
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False)
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def init_checkpoint(directory: str | Path, cfg: Pi0Config, texts: list[str], states: np.ndarray,
                    actions: np.ndarray, sensors: tuple[str, ...] = ("overhead",), seed: int = 0) -> Path:
    """A π0 that has learned nothing yet, written in openpi's file set: randomly initialised weights, a tokenizer
    of ``texts`` (the tasks' instructions) and statistics of ``states`` (N, P) and ``actions`` (N, A) (the
    demonstrations'): where ``flywheel pretrain model=pi0`` starts, and what tests load."""
    from flywheel.vla import openpi

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, directory / "paligemma_tokenizer.model", vocab_size=cfg.vocab_size)
    stats = {"state": fit_stats(states), "actions": fit_stats(actions)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Pi0(cfg)
    return openpi.save(directory, model, stats, tokenizer=tokenizer,
                       record={"sensors": list(sensors), "action_dim": int(actions.shape[-1])})
