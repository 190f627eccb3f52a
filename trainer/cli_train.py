"""``python -m trainer train``: flags → a validated TrainConfig → the same run the web app starts."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from trainer.bases import base_sampling_defaults, default_resolution
from trainer.config import Precision, TrainConfig, field_help, load_config, load_yaml, validate
from trainer.errors import ConfigError, UserError
from trainer.presets import resolve_config
from trainer.scan import scan_dataset
from trainer.trigger import shared_first_tag

# CLI flag -> TrainConfig field, for flags whose names differ only by dashes
_FLAGS = ("base", "base_config", "data", "out", "rank", "alpha", "targets", "precision", "steps", "lr", "lr_scheduler", "warmup_steps",
          "batch_size", "grad_accum", "resolution", "caption_dropout", "flip", "noise_offset", "snr_gamma", "timestep_sampling",
          "trigger", "optimizer", "seed",
          "checkpoint_every", "sample_every", "eval_every", "sample_steps", "sample_guidance", "init_lora", "device", "title",
          "license", "description", "adapter_dtype", "keep_checkpoints", "gradient_checkpointing", "compile",
          "channels_last", "attention", "offload_frozen", "center_crop")
# speed/memory knobs: they change how a step runs, not what it computes, so a resumed run may change them
_KNOBS = ("gradient_checkpointing", "compile", "channels_last", "attention", "offload_frozen")
# what else a resumed run may change: its length, where it runs, what it writes, and the learning rate (the
# advice after a diverged run is "lower it, then --resume"); batch_size may change with the number of
# processes (keep batch_size × processes equal for an exact resume)
_RESUMABLE = ("steps", "device", "sample_every", "eval_every", "checkpoint_every", "batch_size", "lr", "keep_checkpoints",
              "sample_steps", "sample_guidance", "sample_prompts", "title", "license", "description", *_KNOBS)
_PATHS = ("data", "base_config", "init_lora")


def _same(name: str, given, saved) -> bool:
    """Whether flag ``name``'s value is the saved config's (paths compared resolved, enums by value)."""
    if name in _PATHS or (name == "base" and Path(str(given)).expanduser().exists()):
        return Path(str(given)).expanduser().resolve() == Path(str(saved)).expanduser().resolve()
    if name == "precision":
        return str(given) == saved.value
    return given == saved


def resumed_config(args: argparse.Namespace, flags: dict) -> TrainConfig:
    """The run's saved config with the flags a resume may change; any other flag that differs is refused."""
    if not args.out:
        raise UserError("--resume needs --out pointing at the run folder to continue")
    saved_path = Path(args.out) / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"nothing to resume: {saved_path} does not exist (start the run without --resume first)")
    config = load_config(saved_path)
    for name in _PATHS:  # runs saved before paths were stored absolute: relative to the folder they started in
        saved = str(getattr(config, name) or "")
        if saved and not Path(saved).expanduser().is_absolute() and not Path(saved).expanduser().exists():
            if name not in flags:
                raise UserError(f"{name} was saved as {saved!r}, relative to the folder the run was started in, and "
                                f"is not found from here: run the command from that folder, or pass "
                                f"--{name.replace('_', '-')} with the full path")
            config = replace(config, **{name: str(Path(flags[name]).expanduser().resolve())})  # written from here
    changed = [name for name, value in flags.items()
               if name not in _RESUMABLE and name != "out" and not _same(name, value, getattr(config, name))]
    if args.preset or args.config or changed:
        listed = [f"--{n.replace('_', '-')} (saved: {getattr(config, n).value if n == 'precision' else getattr(config, n)})"
                  for n in changed] + (["--preset"] if args.preset else []) + (["--config"] if args.config else [])
        raise UserError(f"--resume continues {args.out} as it was saved; it cannot change {', '.join(listed)}. "
                        "Leave those out, or start a new run with another --out (--init-lora "
                        f"{Path(args.out) / 'lora.safetensors'} starts it from this run's weights)")
    allowed = {k: v for k, v in flags.items() if k in _RESUMABLE}
    resumed = replace(config, out=str(Path(args.out).expanduser().resolve()), **allowed)
    problems = validate(resumed)  # replace() skips the checks make_config runs
    if problems:
        raise ConfigError(problems)
    return resumed


def refuse_used_folder(out: str) -> None:
    """A new run never writes into a folder that holds a trained run (its checkpoints would be pruned)."""
    from trainer.checkpoint import checkpoint_dirs
    from trainer.steps import FILE_NAMES

    run_dir = Path(out)
    held = checkpoint_dirs(run_dir) or [p for p in (run_dir / FILE_NAMES["kohya"],) if p.is_file()]
    if held:
        raise UserError(f"run folder {out} already holds a trained run ({held[-1].name}); continue it with --resume, "
                        "or pick a new --out")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with TrainConfig keys (flags given here override it)")
    p.add_argument("--base", help="demo:sd15|demo:sdxl|demo:flux, a diffusers folder, a .safetensors checkpoint or a hub id")
    p.add_argument("--base-config", help="for a single-file checkpoint: diffusers folder with its configs and tokenizers")
    p.add_argument("--data", help="folder of images with optional <name>.txt captions")
    p.add_argument("--out", help="run folder (default outputs/<data folder name>)")
    p.add_argument("--preset", default=None, help="preset name from presets/ or a YAML path (default: style)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float, help="default 2 x rank")
    p.add_argument("--targets", choices=("style", "attention", "late"))
    p.add_argument("--precision", choices=[x.value for x in Precision])
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-scheduler", choices=("constant", "cosine", "linear"))
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--resolution", type=int, help="default: the base's native size (64 demo bases, 512 SD1.5, 1024 SDXL)")
    p.add_argument("--center-crop", dest="center_crop", action="store_true", default=None,
                   help="crop each picture to its bucket around its centre (the default)")
    p.add_argument("--random-crop", dest="center_crop", action="store_false",
                   help="one seeded random crop per picture instead (drawn once: latents are cached)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror images left-right at random (default off)")
    p.add_argument("--caption-dropout", type=float)
    p.add_argument("--noise-offset", type=float, help="SD1.5/SDXL: offset noise strength (0.05-0.1 usual; 0 off)")
    p.add_argument("--snr-gamma", type=float, help="SD1.5/SDXL: Min-SNR-gamma loss weighting (5 usual; 0 off)")
    p.add_argument("--timestep-sampling", choices=("uniform", "logit_normal"),
                   help="FLUX: how training timesteps are drawn (default uniform)")
    p.add_argument("--trigger")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), nargs="?", const="on",
                   help="auto (default: off on CPU, on a GPU only after running out of memory), on, off; "
                        "the bare flag means on")
    p.add_argument("--compile", choices=("off", "regional"), help="regional: torch.compile each repeated block")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet convolutions in NHWC memory format")
    p.add_argument("--attention", choices=("sdpa", "xformers", "flash"), help="attention kernel (default sdpa)")
    p.add_argument("--offload-frozen", action=argparse.BooleanOptionalAction, default=None,
                   help="VAE and text encoders off the GPU after caching (default on)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--eval-every", type=int, help="fixed-noise loss every N steps (0 = never)")
    p.add_argument("--sample-prompt", action="append", dest="sample_prompts", help="repeatable")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--sample-guidance", type=float)
    p.add_argument("--init-lora", help="continue from an existing LoRA .safetensors")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--title")
    p.add_argument("--license")
    p.add_argument("--description")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--num-processes", type=int, default=1,
                   help="train on N processes (one per GPU; CPU uses gloo) by relaunching under torchrun")
    helps, presetted = field_help(), {"rank", "alpha", "steps", "lr", "batch_size"}
    for action in p._actions:  # a flag without its own help says what the config field's does (the Train tab's)
        if action.help is None and action.dest in helps and helps[action.dest]:
            action.help = helps[action.dest].replace("%", "%%") + (" (default: the preset's)" if action.dest in presetted else "")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """Defaults ← preset ← --config file ← flags; a resumed run reuses its saved config."""
    flags = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    if args.sample_prompts:
        flags["sample_prompts"] = tuple(args.sample_prompts)
    if args.resume:
        return resumed_config(args, flags), []
    values = load_yaml(args.config) if args.config else {}
    preset = args.preset or values.pop("preset", "style")
    values.update(flags)
    if not values.get("data"):
        raise UserError("--data is required: a folder of images (with optional <name>.txt captions)")
    values.setdefault("base", "demo:sd15")
    values.setdefault("out", str(Path("outputs") / Path(values["data"]).resolve().name))
    # stored absolute in config.yaml: a --resume (or an export) from another folder finds them again
    for name in (*_PATHS, "out"):
        if values.get(name):
            values[name] = str(Path(str(values[name])).expanduser().resolve())
    if Path(str(values["base"])).expanduser().exists():  # a local base folder or file, not a hub id or demo:
        values["base"] = str(Path(str(values["base"])).expanduser().resolve())
    if "resolution" not in values:
        values["resolution"] = default_resolution(values["base"])
    for key, value in base_sampling_defaults(values["base"]).items():
        values.setdefault(f"sample_{key}", value)  # the base's own tuned sampling, unless given
    return resolve_config(preset, values)


def finished_at(config: TrainConfig) -> int | None:
    """The step a run to resume already finished at, when it is at or past ``config.steps`` and its LoRA files
    were written after that checkpoint (a run killed while exporting resumes to write them)."""
    from trainer.checkpoint import checkpoint_dirs, checkpoint_step
    from trainer.steps import FILE_NAMES

    checkpoints = checkpoint_dirs(Path(config.out))
    if not checkpoints or checkpoint_step(checkpoints[-1]) < config.steps:
        return None
    exports = [Path(config.out) / FILE_NAMES[key] for key in ("kohya", "diffusers")]
    try:
        written = min(path.stat().st_mtime for path in exports)
        return checkpoint_step(checkpoints[-1]) if written >= checkpoints[-1].stat().st_mtime else None
    except OSError:
        return None


def untold_trigger(config: TrainConfig) -> list[str]:
    """A warning when every caption starts with the same word but no --trigger was given: the exports' trigger
    phrase and the A1111 card's activation text would be empty (the web app fills the trigger box for a demo
    set)."""
    if config.trigger:
        return []
    try:
        scan = scan_dataset(config.data)
    except UserError:
        return []  # the run says what is wrong with the folder
    word = shared_first_tag([item.caption for item in scan.items if not item.from_file_name])
    if word is None:
        return []
    return [f"every caption starts with {word!r} but no --trigger was given: the LoRA files will name no trigger "
            f"phrase (pass --trigger {word})"]


def relaunch_distributed(processes: int, argv: list[str]) -> int:
    """Run this same command on ``processes`` local processes (``trainer.distributed.launch``), minus --num-processes."""
    from trainer.distributed import launch

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            rest.append(arg)
    return launch(processes, rest)


def run(args: argparse.Namespace) -> int:
    from trainer.checkpoint import fewer_steps_in
    from trainer.distributed import world_size_from_env
    from trainer.loop import run_training

    if args.num_processes < 1:
        raise UserError(f"--num-processes {args.num_processes}: at least 1 (one process per GPU)")
    if args.num_processes > 1 and world_size_from_env() == 1:
        return relaunch_distributed(args.num_processes, sys.argv[1:])

    config, warnings = config_from_args(args)
    if not args.resume:
        refuse_used_folder(config.out)
        warnings += untold_trigger(config)
    elif (refused := fewer_steps_in(Path(config.out), config.steps)):  # before the finished-run note: a typo's
        raise UserError(refused)  # `--steps 10` on a run at step 60 must not end with exit status 0
    elif (done := finished_at(config)) is not None:
        print(f"{config.out} already trained all {done} steps; to train on, pass --steps with more (e.g. "
              f"--steps {2 * done})")
        return 0
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    stop = threading.Event()
    signalled: list[int] = []

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        signalled.append(signum)
        stop.set()
        if os.environ.get("RANK", "0") == "0":  # said once, not by each process of a multi-process run
            print("\nstopping after this step (checkpoint and exports will be written; press Ctrl-C again to abort)",
                  file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        result = run_training(config, emit=_print_notable, stop=stop, resume=args.resume, show_progress=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.exports:  # only the main process writes (and reports) exports
        verb = "stopped" if result.stopped else "done"
        print(f"{verb} at step {result.step}: " + ", ".join(result.exports))
    elif result.stopped and result.step == 0 and os.environ.get("RANK", "0") == "0":
        print("stopped before the first step: no checkpoint and no exports were written")
    # stopped by Ctrl-C/SIGTERM: 128 + the signal, as a shell reports it, so a script can tell it from a finished run.
    # Of several processes only the main one says so: it ends last (after the exports), while a non-zero code
    # from another would make torchrun stop the main one mid-export.
    if result.stopped and signalled and os.environ.get("RANK", "0") == "0":
        return 128 + signalled[0]
    return 0


def _print_notable(event) -> None:
    """What the run trains with, where it resumes, and log lines (skipped files, warnings) go to stderr; steps are
    shown by the progress bar."""
    from trainer import events as ev

    if isinstance(event, (ev.Log, ev.Start)):
        print(f"note: {event.message}", file=sys.stderr)
