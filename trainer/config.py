"""Training configuration: one frozen dataclass, validated as a whole.

Every field carries its help text (as peft's ``LoraConfig`` does) so the CLI,
the web app and ``config.yaml`` explain themselves. :func:`validate` collects
*every* problem and raises one :class:`ConfigError` (as torchtune does): a web
user should see all of them at once, not one per click.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError
from trainer.objective import TIMESTEP_SAMPLINGS


class Precision(str, enum.Enum):
    """dtype of the frozen base model (the LoRA itself trains in ``adapter_dtype``)."""

    AUTO = "auto"  # bf16 where supported, else fp16 on GPU, fp32 on CPU
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    NF4 = "nf4"  # 4-bit NormalFloat + double quantization (QLoRA)


TARGET_SETS = ("style", "attention", "late")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
SCHEDULERS = ("constant", "cosine", "linear")
ADAPTER_DTYPES = ("fp32", "bf16")
COMPILE_MODES = ("off", "regional")
CHECKPOINTING_MODES = ("auto", "on", "off")
ATTENTION_KERNELS = ("sdpa", "xformers", "flash")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


MAX_SEED = 2**32 - 1  # the seeds A1111 and kohya show; torch takes them with room for seed + i


@dataclass(frozen=True)
class TrainConfig:
    base: str = _help("Base model: demo:sd15|demo:sdxl|demo:flux, a diffusers folder, a .safetensors file or a hub id.", default="demo:sd15")
    base_config: str = _help("For a single-file checkpoint: a diffusers folder with the matching configs/tokenizers (offline loading).", default="")
    data: str = _help("Folder of training images (+ optional <name>.txt captions).", default="")
    out: str = _help("Run folder; exports, checkpoints, samples and events land here.", default="outputs/run")
    preset: str = _help("Preset the values came from (for the record).", default="style")
    rank: int = _help("LoRA rank r: 1 tone, 4 light style, 8 style, 16 rich, 32 default, 64 complex.", default=8)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha/rank (2r by default).", default=16.0)
    targets: str = _help("Which layers get adapters: style (cross-attn to_k/to_v), attention (q/k/v/out), late (last blocks).", default="style")
    precision: Precision = _help("Base model dtype: auto, fp32, fp16, bf16 or nf4.", default=Precision.AUTO)
    adapter_dtype: str = _help("fp32, or bf16: the training step (base and LoRA) runs under bf16 autocast; the LoRA "
                               "weights and optimizer stay fp32, else most bf16 updates round away.", default="fp32")
    steps: int = _help("Total optimizer steps.", default=500)
    lr: float = _help("Peak learning rate.", default=1e-4)
    lr_scheduler: str = _help("constant, cosine or linear decay after warmup.", default="constant")
    warmup_steps: int = _help("Linear warmup steps.", default=0)
    batch_size: int = _help("Images per step.", default=1)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", default=1)
    resolution: int = _help("Training side length; buckets keep about resolution² pixels (multiples of 64).", default=512)
    center_crop: bool = _help("Center-crop each picture to its bucket (off: one seeded random crop per picture, "
                              "drawn once, since latents are cached; kohya refuses random crops with a latent cache).",
                              default=True)
    flip: bool = _help("Mirror images left-right at random: each step shows each image flipped or not, half and "
                       "half (both are cached). Leave off for lettering or one-sided motifs.", default=False)
    caption_dropout: float = _help("Probability of training on the empty caption (keeps CFG working).", default=0.0)
    noise_offset: float = _help("SD1.5/SDXL: add offset × N(0, 1) per image and channel to the training noise, so the "
                                "LoRA can learn darker darks and brighter brights (0.05–0.1 is usual; 0 = off).",
                                default=0.0)
    snr_gamma: float = _help("SD1.5/SDXL: Min-SNR-γ loss weighting (Hang et al. 2023), which stops the easy, "
                             "low-noise timesteps dominating; 5 is the paper's value, 0 = off.", default=0.0)
    timestep_sampling: str = _help("FLUX: uniform, or logit_normal (the SD3 paper's sigmoid of N(0, 1): more steps at "
                                   "mid noise levels).", default="uniform")
    trigger: str = _help("Trigger word prepended to every caption that lacks it.", default="")
    optimizer: str = _help("adamw, adamw8bit or paged_adamw8bit (the last two need bitsandbytes + CUDA).", default="adamw")
    weight_decay: float = _help("AdamW weight decay.", default=1e-2)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0)
    gradient_checkpointing: str = _help("Recompute activations in backward to save memory: on, off, or auto "
                                        "(off on CPU; on a GPU off until a step runs out of memory, then on).", default="auto")
    compile: str = _help("torch.compile: off, or regional (each repeated transformer block; first steps are slow "
                         "while it compiles). Off until GPU measurements show it wins.", default="off")
    channels_last: bool = _help("UNet weights and activations in channels_last (NHWC) memory format; "
                                "ignored for FLUX.", default=False)
    attention: str = _help("Attention kernel: sdpa (PyTorch picks), flash (PyTorch's FlashAttention kernel only) "
                           "or xformers (needs the xformers package).", default="sdpa")
    offload_frozen: bool = _help("Move the VAE and text encoders off the GPU once latents and captions are cached; "
                                 "they come back only to render samples (no effect on CPU).", default=True)
    seed: int = _help("Seed for init, data order, noise and samples: same seed, same run (on CPU).", default=42)
    checkpoint_every: int = _help("Write a resumable checkpoint every N steps (0 = only at the end).", default=100)
    keep_checkpoints: int = _help("How many checkpoints to keep (oldest are deleted). Each is a step the run can "
                                  "still be exported at, should an earlier one look best.", default=5)
    sample_every: int = _help("Render sample images every N steps (0 = never).", default=100)
    eval_every: int = _help("Every N steps, the loss on fixed noise and timesteps for the first 8 images: a curve that "
                            "moves only when the weights do, unlike the training loss (0 = never).", default=0)
    sample_prompts: tuple[str, ...] = _help("Prompts for sample images (empty: the first captions).", default=())
    sample_steps: int = _help("Denoising steps for sample images.", default=20)
    sample_guidance: float = _help("Classifier-free guidance for sample images.", default=5.0)
    init_lora: str = _help("Start from an existing LoRA file (continue a prior run).", default="")
    device: str = _help("auto, cpu or cuda.", default="auto")
    title: str = _help("Title written into the export metadata.", default="")
    license: str = _help("License written into the export metadata.", default="")
    description: str = _help("Description written into the export metadata.", default="")


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}


RESOLUTION_RULE = "a multiple of 64, at least 64"  # latents are 1/8 of the pixels; the buckets step by 64 px


def valid_resolution(value) -> bool:
    """Whether ``value`` can be a training resolution (the config check, check-data and the Dataset tab ask)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 64 and value % 64 == 0


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with ``cfg``, each naming the field, the value and what is allowed."""
    problems = []

    def need(cond: bool, name: str, allowed: str) -> None:
        if not cond:
            problems.append(f"{name}={getattr(cfg, name)!r}: must be {allowed}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    need(isinstance(cfg.base, str) and cfg.base.strip() != "", "base", "a model path, hub id or demo:<arch>")
    need(isinstance(cfg.rank, int) and not isinstance(cfg.rank, bool) and 1 <= cfg.rank <= 1024, "rank", "an integer from 1 to 1024")
    need(finite(cfg.alpha) and cfg.alpha > 0, "alpha", "a number > 0")
    need(cfg.targets in TARGET_SETS, "targets", f"one of {', '.join(TARGET_SETS)}")
    need(cfg.adapter_dtype in ADAPTER_DTYPES, "adapter_dtype", f"one of {', '.join(ADAPTER_DTYPES)}")
    need(isinstance(cfg.steps, int) and cfg.steps >= 1, "steps", "an integer >= 1")
    need(finite(cfg.lr) and cfg.lr > 0, "lr", "a number > 0")
    need(cfg.lr_scheduler in SCHEDULERS, "lr_scheduler", f"one of {', '.join(SCHEDULERS)}")
    need(isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
    need(isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "batch_size", "an integer >= 1")
    need(isinstance(cfg.grad_accum, int) and cfg.grad_accum >= 1, "grad_accum", "an integer >= 1")
    need(valid_resolution(cfg.resolution), "resolution", RESOLUTION_RULE)
    need(finite(cfg.caption_dropout) and 0 <= cfg.caption_dropout < 1, "caption_dropout", "in [0, 1)")
    need(finite(cfg.noise_offset) and 0 <= cfg.noise_offset <= 1, "noise_offset", "in [0, 1] (0 = off)")
    need(finite(cfg.snr_gamma) and cfg.snr_gamma >= 0, "snr_gamma", "a number >= 0 (0 = off)")
    need(cfg.timestep_sampling in TIMESTEP_SAMPLINGS, "timestep_sampling", f"one of {', '.join(TIMESTEP_SAMPLINGS)}")
    need(cfg.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}")
    need(cfg.gradient_checkpointing in CHECKPOINTING_MODES, "gradient_checkpointing",
         f"one of {', '.join(CHECKPOINTING_MODES)} (true/false mean on/off)")
    need(cfg.compile in COMPILE_MODES, "compile", f"one of {', '.join(COMPILE_MODES)}")
    need(cfg.attention in ATTENTION_KERNELS, "attention", f"one of {', '.join(ATTENTION_KERNELS)}")
    need(isinstance(cfg.flip, bool), "flip", "true or false")
    need(isinstance(cfg.channels_last, bool), "channels_last", "true or false")
    need(isinstance(cfg.offload_frozen, bool), "offload_frozen", "true or false")
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(finite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0, "max_grad_norm", "a number >= 0")
    need(isinstance(cfg.seed, int) and 0 <= cfg.seed <= MAX_SEED, "seed", f"an integer from 0 to {MAX_SEED}")
    need(isinstance(cfg.checkpoint_every, int) and cfg.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
    need(isinstance(cfg.keep_checkpoints, int) and cfg.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1")
    need(isinstance(cfg.sample_every, int) and cfg.sample_every >= 0, "sample_every", "an integer >= 0")
    need(isinstance(cfg.eval_every, int) and not isinstance(cfg.eval_every, bool) and cfg.eval_every >= 0,
         "eval_every", "an integer >= 0")
    need(isinstance(cfg.sample_steps, int) and 1 <= cfg.sample_steps <= 200, "sample_steps", "an integer from 1 to 200")
    need(finite(cfg.sample_guidance) and cfg.sample_guidance >= 0, "sample_guidance", "a number >= 0")
    need(cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"), "device", "auto, cpu or cuda[:N]")
    need(isinstance(cfg.sample_prompts, tuple) and all(isinstance(p, str) for p in cfg.sample_prompts), "sample_prompts", "a list of strings")
    return problems


def alpha_ratio_warning(rank: int, alpha: float) -> str | None:
    """A warning when alpha/rank leaves 0.5–2, where learning rates stop transferring between ranks."""
    ratio = alpha / rank
    if 0.5 <= ratio <= 2.0:
        return None
    return (f"alpha/rank = {alpha:g}/{rank} = {ratio:.2f} is outside 0.5–2: the update is scaled by {ratio:.2f}, "
            f"so the learning rate will behave very differently from the presets (alpha = 2r is the default)")


def _coerce(name: str, value: Any) -> Any:
    """YAML/CLI values into the field's type; wrong types are left for validate() to report."""
    if name == "precision":
        try:
            return Precision(value)
        except ValueError:
            raise ConfigError([f"precision={value!r}: must be one of {', '.join(p.value for p in Precision)}"]) from None
    if name == "sample_prompts":
        if isinstance(value, str):
            return (value,) if value else ()
        if isinstance(value, (list, tuple)):
            return tuple(value)
    if name == "gradient_checkpointing" and isinstance(value, bool):
        return "on" if value else "off"  # configs and config.yaml files written before auto/on/off
    if name == "compile" and value is False:
        return "off"  # YAML 1.1 reads a bare `off` as false
    if name in ("alpha", "noise_offset", "snr_gamma") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name in ("lr", "weight_decay") and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            return value
    return value


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a config; unknown keys and bad values are reported together."""
    known = {f.name for f in fields(TrainConfig)}
    problems = [f"unknown key {k!r} (known keys: {', '.join(sorted(known))})" for k in values if k not in known]
    coerced = {}
    for key, value in values.items():
        if key in known:
            try:
                coerced[key] = _coerce(key, value)
            except ConfigError as err:
                problems.extend(err.problems)
    cfg = TrainConfig(**coerced)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["precision"] = cfg.precision.value
    d["sample_prompts"] = list(cfg.sample_prompts)
    return d


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"cannot read {path}: {err}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path} is not valid YAML{where}: {what}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a mapping of key: value"])
    return data


def load_config(path: str | Path) -> TrainConfig:
    return make_config(load_yaml(path))


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
