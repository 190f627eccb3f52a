"""The training loop: one LoRA on a frozen base, resumable, stoppable, observable.

``run_training`` is what the CLI, the web app's background job and the tests
call. It emits :mod:`trainer.events` (also appended to ``<run>/events.jsonl``),
checks the stop flag between steps, writes checkpoints, samples and exports.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch

from trainer import events as ev
from trainer.atomic import atomic_path, write_text
from trainer.bases import parse_base
from trainer.checkpoint import TrainState, checkpoint_dirs, fewer_steps_in, load_checkpoint, save_checkpoint
from trainer.config import Precision, TrainConfig, dump_yaml
from trainer.distributed import Dist, setup
from trainer.data import BatchPlan, Example, dataset_hash, prepare, tag_frequency
from trainer.dataset_check import check_prepared
from trainer.errors import ConfigError, DataError, TrainingDiverged, UnsupportedError, UserError, WriteError
from trainer.eval_loss import eval_batches, fixed_noise_loss
from trainer.export import (LR_HISTORY, ExportInfo, export_lora, from_peft_state_dict, learning_rates,
                            load_export_info, save_export_info, training_record, weights_from_file)
from trainer.models import LoadedBase, load_base
from trainer.models.knobs import checkpointing_plan, frozen_parts, prepare_denoiser
from trainer.objective import Objective, check_objective
from trainer.scan import scan_dataset
from trainer.steps import sample_file
from trainer.step import StepParts, grad_scaler, train_step
from trainer.targets import resolve

ADAPTER = "default"


@dataclass(frozen=True)
class RunResult:
    step: int
    stopped: bool
    exports: tuple[str, ...]


@dataclass
class Cache:
    """Latents and text embeddings computed once; the VAE and text encoders are not needed per step."""

    latents: list[torch.Tensor]
    text: dict[str, dict[str, torch.Tensor]]  # caption -> conditioning tensors
    extra: list[dict[str, torch.Tensor]]
    mirrored: Optional[list[torch.Tensor]] = None  # flip on: latents of the left-right mirrored images
    mirrored_extra: Optional[list[dict[str, torch.Tensor]]] = None  # and their conditioning (SDXL's crop corner)


@contextlib.contextmanager
def vae_for_encoding(vae):
    """An fp16 VAE whose config says ``force_upcast`` (SDXL's and FLUX's: they overflow in fp16) encodes in
    fp32, as diffusers' own pipelines decode with it and its SDXL training script keeps it."""
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


def build_cache(base: LoadedBase, examples: list[Example], batch: int = 8, mirrored: bool = False) -> Cache:
    """Latents of every example (by bucket, ``batch`` at a time) and the text conditioning of every caption.

    ``mirrored``: also encode each image flipped left-right. A VAE's latent of a mirrored image is not exactly
    the mirrored latent, so flip augmentation encodes both instead of flipping latents.

    Raises:
        DataError: an image's latent is not finite (the VAE overflowed on it).
    """
    handler, pipe = base.handler, base.pipe
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        by_bucket.setdefault(ex.bucket, []).append(i)

    def encode_all(flip: bool) -> list[torch.Tensor]:
        latents: list[Optional[torch.Tensor]] = [None] * len(examples)
        for indices in by_bucket.values():
            for start in range(0, len(indices), batch):
                chunk = indices[start:start + batch]
                pixels = torch.stack([examples[i].pixels for i in chunk])
                encoded = handler.encode_image(pipe, (pixels.flip(-1) if flip else pixels).to(base.device))
                for i, lat in zip(chunk, encoded):
                    if not torch.isfinite(lat).all():
                        raise DataError(f"{Path(examples[i].source).name}: the VAE gave a non-finite latent "
                                        f"({base.precision.value}); train with precision fp32 or bf16, or leave "
                                        "this image out")
                    latents[i] = lat
        return latents

    with vae_for_encoding(pipe.vae):
        latents = encode_all(flip=False)
        flipped = encode_all(flip=True) if mirrored else None
    captions = sorted({ex.caption for ex in examples} | {""})
    text = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        text.update(zip(chunk, handler.encode_text(pipe, chunk)))
    extra = [handler.extra_conditioning(pipe, ex.original_size, ex.crop_top_left, (ex.bucket[1], ex.bucket[0]),
                                        None, None) for ex in examples]
    mirrored_extra = [handler.extra_conditioning(pipe, ex.original_size, ex.mirrored_crop_top_left,
                                                 (ex.bucket[1], ex.bucket[0]), None, None)
                      for ex in examples] if mirrored else None
    return Cache(latents=latents, text=text, extra=extra, mirrored=flipped, mirrored_extra=mirrored_extra)


def shared_cache(base: LoadedBase, examples: list[Example], run_dir: Path, dist: Dist, mirrored: bool) -> Cache:
    """Compute the cache once: the main process encodes, the others wait and read its file."""
    if dist.world == 1:
        return build_cache(base, examples, mirrored=mirrored)
    path = run_dir / "cache.pt"
    if dist.is_main:
        cache = build_cache(base, examples, mirrored=mirrored)
        with atomic_path(path) as tmp:  # asdict would copy every tensor
            torch.save({f.name: getattr(cache, f.name) for f in fields(cache)}, tmp)
    dist.barrier()
    if not dist.is_main:
        cache = Cache(**torch.load(path, map_location="cpu", weights_only=True))
    dist.barrier()  # every process holds it now: the file (all latents and embeddings) would only fill the disk
    if dist.is_main:
        path.unlink(missing_ok=True)
    return cache


def continue_schedule(optimizer, lr_scheduler, lr: float) -> list[str]:
    """A resumed run's learning rate at its step, from the schedule as configured now; returns notes to log.

    The checkpoint holds the rate its last step set. A resume may change the peak (``--lr``, the advice after a
    diverged run) or the total (``--steps``: a cosine or linear schedule stretches to the new end), so the rate
    is recomputed from the schedule instead of taken over: a finished cosine run would otherwise train its next
    step at 0. With neither changed it is the saved rate, to the bit (the same formula).
    """
    notes = []
    old = lr_scheduler.base_lrs[0]
    if old != lr:
        lr_scheduler.base_lrs = [lr for _ in lr_scheduler.base_lrs]
        notes.append(f"learning rate changed on resume: {old:g} -> {lr:g} (the schedule continues at the new scale)")
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, peak, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if old == lr and lr_scheduler._last_lr != saved:
        notes.append(f"the schedule now ends at the new total: the learning rate continues at "
                     f"{lr_scheduler._last_lr[0]:g} (the checkpoint's schedule was at {saved[0]:g})")
    return notes


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=device.type == "cuda")
    if device.type != "cuda":
        raise UnsupportedError(f"optimizer {config.optimizer} needs a CUDA GPU; use --optimizer adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if config.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def flux_dims(base: LoadedBase) -> tuple[int, int] | None:
    if base.arch != "flux":
        return None
    d = base.denoiser
    inner = d.config.num_attention_heads * d.config.attention_head_dim
    return inner, d.single_transformer_blocks[0].proj_mlp.out_features if len(d.single_transformer_blocks) else 4 * inner


def inject_lora(base: LoadedBase, config: TrainConfig) -> list[str]:
    """Add the trainable adapter to the denoiser; returns the adapted module names."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    denoiser = base.denoiser
    names = resolve(base.arch, config.targets, [n for n, _ in denoiser.named_modules()])
    torch.manual_seed(config.seed)
    denoiser.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=names,
                                    init_lora_weights=True), adapter_name=ADAPTER)
    if config.init_lora:
        prior = weights_from_file(config.init_lora, names, flux_dims(base))
        if prior.rank != config.rank:
            raise ConfigError([f"init_lora {Path(config.init_lora).name} has rank {prior.rank}; pass --rank {prior.rank}"])
        rescale = (prior.alpha / prior.rank) / (config.alpha / config.rank)  # keep ΔW when alphas differ
        state = {}
        for module, (a, b) in prior.modules.items():
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b * rescale
        set_peft_model_state_dict(denoiser, state, adapter_name=ADAPTER)
    # fp32 weights whatever adapter_dtype says: AdamW updates of ~lr·1 on weights of ~1e-2 are below bf16's
    # resolution, so pure-bf16 weights left 80 % of them unchanged per step (measured); bf16 is a compute dtype
    cast_training_params(denoiser, dtype=torch.float32)
    return names


def sample_prompts(config: TrainConfig, examples: list[Example]) -> list[str]:
    if config.sample_prompts:
        return list(config.sample_prompts)
    return list(dict.fromkeys(ex.caption for ex in examples))[:2]


@torch.no_grad()
def render_samples(base: LoadedBase, prompts: list[str], config: TrainConfig, size: tuple[int, int]):
    """One image per prompt with fixed seeds (seed + i), so samples are comparable across steps."""
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(config.seed + i)
        out = base.pipe(prompt=prompt, num_inference_steps=config.sample_steps, width=size[0], height=size[1],
                        generator=generator, **base.sampling_kwargs(config.sample_guidance))
        images.append(out.images[0])
    return images


def _batch(cache: Cache, plan: BatchPlan, index: int, config: TrainConfig, examples: list[Example],
           generator: torch.Generator, device: torch.device, dist: Dist):
    """This process's rows of global batch ``index``; caption dropout and flips are drawn for the whole batch."""
    global_ids = plan.batch(index)
    drop = (torch.rand(len(global_ids), generator=generator) < config.caption_dropout).tolist()
    # drawn only with flip on, so a run without it draws what it always drew
    flip = (torch.rand(len(global_ids), generator=generator) < 0.5).tolist() if config.flip else [False] * len(drop)
    local = len(global_ids) // dist.world
    ids = global_ids[dist.rank * local:(dist.rank + 1) * local]
    drop = drop[dist.rank * local:(dist.rank + 1) * local]
    flip = flip[dist.rank * local:(dist.rank + 1) * local]
    latents = torch.stack([cache.mirrored[i] if f else cache.latents[i] for i, f in zip(ids, flip)]).to(device)
    texts = [cache.text["" if d else examples[i].caption] for i, d in zip(ids, drop)]
    cond = {k: torch.stack([t[k] for t in texts]).to(device) for k in texts[0]}
    extras = [cache.mirrored_extra[i] if f else cache.extra[i] for i, f in zip(ids, flip)]
    for key in extras[0]:
        cond[key] = torch.stack([extra[key] for extra in extras]).to(device)
    return latents, cond


def run_training(config: TrainConfig, emit: Optional[ev.Emit] = None, stop: Optional[threading.Event] = None,
                 resume: bool = False, show_progress: bool = False) -> RunResult:
    """Train a LoRA as ``config`` says; see the module docstring.

    Raises:
        UserError: bad data, base or config (also recorded in events.jsonl);
        TrainingDiverged: NaN/inf loss (the last good checkpoint is kept).
    """
    run_dir = Path(config.out)
    if resume and (refused := fewer_steps_in(run_dir, config.steps)):  # before a line goes to its events.jsonl:
        raise UserError(refused)  # a typo must not mark the run failed
    stop = stop or threading.Event()
    dist = setup(config.device)
    created = dist.is_main and not run_dir.exists()  # a run refused before it wrote anything leaves no folder behind
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            what = "is a file" if run_dir.is_file() or isinstance(err, FileExistsError) else \
                f"cannot be created ({err.strerror or err})"
            raise WriteError(f"run folder {run_dir} {what}; pick another --out") from None
    dist.barrier()
    events_path = run_dir / "events.jsonl"

    def emit_all(event: ev.Event) -> None:
        if not dist.is_main:
            return  # one writer: the main process
        try:
            ev.append_jsonl(events_path, event)
        except OSError as err:
            raise WriteError(f"cannot write {events_path} ({err.strerror or err}); the run folder must be writable "
                             "and have free space") from None
        if emit is not None:
            emit(event)

    try:
        return _train(config, run_dir, emit_all, stop, resume, show_progress and dist.is_main, dist)
    except Exception as err:
        failure = dist.explain(err)  # several processes: a collective broken by another one's failure is PeerFailed
        message = str(failure) if isinstance(failure, UserError) else f"internal error: {type(err).__name__}: {err}"
        line = dist.error_line(failure, message, events_path)
        if line is not None:
            try:
                ev.append_jsonl(events_path, ev.Error(message=line))
            except OSError:
                pass  # a folder that cannot be written to is the error being raised; it must not be masked
        with contextlib.suppress(OSError):  # gone or unreadable meanwhile: the error raised is the one to see
            if created and {p.name for p in run_dir.iterdir()} <= {"events.jsonl"}:
                shutil.rmtree(run_dir, ignore_errors=True)  # a missing --data or base: nothing of the run to keep
        if failure is err:
            raise
        raise failure from err


def epochs(batches: int, batches_per_epoch: int) -> str:
    """How many times ``batches`` go over the data (epochs), for the start line: "25 passes over the images"."""
    count = batches / max(batches_per_epoch, 1)
    shown = f"{count:.0f}" if count >= 10 else f"{count:.2g}"
    return f"{shown} pass{'' if shown == '1' else 'es'} over the images"


def dataset_check_lines(examples: list[Example], config: TrainConfig, base: LoadedBase) -> list[str]:
    """What ``trainer.dataset_check`` finds, as log lines. Advice only: a check that fails says so and the run
    goes on."""
    try:
        findings = check_prepared(examples, config.resolution, config.data, base.handler.caption_reader(base.pipe),
                                  config.trigger)
    except Exception as err:  # a tokenizer or file oddity must not stop a run the check only advises on
        return [f"dataset check skipped ({type(err).__name__}: {err})"]
    if not findings:
        return [f"dataset check: nothing to fix in {len(examples)} pictures and their captions"]
    return [f"dataset check: {finding.line()}" for finding in findings]


def _train(config: TrainConfig, run_dir: Path, emit: ev.Emit, stop: threading.Event, resume: bool,
           show_progress: bool, dist: Dist) -> RunResult:
    started_at = time.time()
    checkpoints = checkpoint_dirs(run_dir)
    if resume and not checkpoints:
        raise UserError(f"nothing to resume in {run_dir}: it has no checkpoint yet; start the run again without --resume")
    scan = scan_dataset(config.data)
    for warning in scan.warnings:
        emit(ev.Log(message=warning))
    objective = Objective.of(config)
    check_objective(parse_base(config.base).arch, objective)  # before loading, where the base says what it is
    base = load_base(config.base, config.precision, dist.device(config.device), config.base_config or None)
    check_objective(base.arch, objective)  # a hub id says it only once loaded
    examples, skipped = prepare(scan, config.resolution, config.center_crop, config.trigger, config.seed)
    for name, reason in skipped:
        emit(ev.Log(message=f"skipped {name}: {reason}"))
    if not resume:  # a resumed run was looked over when it started
        for line in dataset_check_lines(examples, config, base):
            emit(ev.Log(message=line))
    if dist.is_main:
        write_text(run_dir / "config.yaml", dump_yaml(config))
    cache = shared_cache(base, examples, run_dir, dist, mirrored=config.flip)
    frozen = frozen_parts(base, config.offload_frozen)
    frozen.park()  # the cache replaces the VAE and text encoders until samples are rendered
    names = inject_lora(base, config)
    for note in prepare_denoiser(base, config):
        emit(ev.Log(message=note))
    denoiser = base.denoiser
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, base.device)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(config.lr_scheduler if config.lr_scheduler != "constant" else "constant_with_warmup",
                                 optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    noise_scheduler = base.handler.training_scheduler(base.pipe)
    generator = torch.Generator().manual_seed(config.seed)
    if config.adapter_dtype == "bf16" and base.precision is Precision.FP16:
        raise ConfigError(["adapter_dtype bf16 with an fp16 base mixes two half types in every layer; use "
                           "adapter_dtype fp32 (or a bf16 base where the GPU has it)"])
    scaler = grad_scaler(base.precision.value, base.device, dist.sharded)
    start_step, trained_at = 0, config.lr
    if resume:
        start_step, trained_at = _restore(checkpoints[-1], config, denoiser, optimizer, lr_scheduler, generator,
                                          scaler, emit)
    forward = dist.wrap(denoiser, optimizer)
    params = [p for p in denoiser.parameters() if p.requires_grad]  # FSDP swapped them for shards
    if dist.world > 1:
        emit(ev.Log(message=dist.describe(denoiser)))
    plan = BatchPlan(examples, config.batch_size * dist.world, config.seed, pad_to_full=dist.world > 1)
    largest = max(len(indices) for indices in plan.by_bucket.values())
    if dist.world == 1 and config.batch_size > largest:  # several processes pad their batches instead
        emit(ev.Log(message=f"batch_size {config.batch_size} is more than the {largest} image(s) of the largest size "
                            f"group: a batch holds one size group, so batches have at most {largest} image(s)"))
    prompts = sample_prompts(config, examples)
    sample_size = max({ex.bucket for ex in examples}, key=lambda b: sum(ex.bucket == b for ex in examples))
    emit(ev.Start(run_dir=str(run_dir), total_steps=config.steps, start_step=start_step, images=len(examples),
                  arch=base.arch, sample_every=config.sample_every, eval_every=config.eval_every,
                  message=f"{'resumed at step ' + str(start_step) if resume else 'started'}: "
                  f"{len(examples)} images, {len(names)} adapted modules, {config.steps} steps = "
                  f"{epochs(config.steps * config.grad_accum, plan.batches_per_epoch)}, on {base.arch} "
                  f"({base.precision.value}, {base.device.type})"))

    info = None  # what the exports record; hashing the base's weights and the images is the main process's job
    if dist.is_main:
        info = _export_info(config, base, run_dir, examples, started_at, dist.world,
                            (trained_at, start_step) if resume else None)
        save_export_info(run_dir, info)
    saved_at = start_step if resume else None  # the same on every process: deciding from the disk would race
    # chunks of the global batch: no more memory than a training step, and the same draws on any number of processes
    eval_set = eval_batches(cache.latents, [{**cache.text[ex.caption], **cache.extra[i]} for i, ex in enumerate(examples)],
                            [ex.bucket for ex in examples], config.batch_size * dist.world) if config.eval_every else []

    def checkpoint(step: int) -> None:
        nonlocal saved_at
        saved_at = step
        adapter = dist.full_state(adapted_state(denoiser))  # under FSDP every process takes part in gathering
        optimizer_state = dist.optimizer_state(optimizer)
        if not dist.is_main:
            return
        path = save_checkpoint(run_dir, TrainState(step=step, adapter=adapter, optimizer=optimizer_state,
                                                   lr_scheduler=lr_scheduler.state_dict(), generator=generator.get_state(),
                                                   scaler=scaler.state_dict() if scaler is not None else None),
                               keep=config.keep_checkpoints)
        emit(ev.Checkpoint(step=step, path=str(path)))

    def evaluate(step: int) -> None:
        """Every process computes it (under FSDP each denoiser call gathers the shards of all); the main one says it."""
        t0 = time.perf_counter()
        loss = fixed_noise_loss(base.handler, base.pipe, denoiser, noise_scheduler, eval_set, config.seed + 1,
                                base.device, config.attention, parts.compute_dtype)
        if progress is not None:
            progress.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "-", eval=f"{loss:.4f}")
        emit(ev.Eval(step=step, loss=loss, seconds=time.perf_counter() - t0))

    def sample(step: int) -> None:
        if not dist.is_main and not dist.sharded:
            return  # under FSDP every process renders: each denoiser call gathers the shards of all
        t0 = time.perf_counter()
        denoiser.eval()
        paths = []
        with frozen.resident():
            images = render_samples(base, prompts, config, sample_size)
        if not dist.is_main:
            denoiser.train()
            return
        for i, image in enumerate(images):
            path = sample_file(run_dir, step, i)
            with atomic_path(path) as tmp:  # the page and the samples .zip may read it while it is written
                image.save(tmp, format="PNG")
            paths.append(str(path))
        denoiser.train()
        emit(ev.Sample(step=step, paths=tuple(paths), prompts=tuple(prompts), seconds=time.perf_counter() - t0))

    def fetch(index: int):
        return _batch(cache, plan, index, config, examples, generator, base.device, dist)

    def require_finite(loss: float, grad_norm: float, at: int) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = checkpoint_dirs(run_dir)
            raise TrainingDiverged(
                f"training diverged at step {at + 1} (loss={loss}, grad norm={grad_norm}); "
                f"{'the last good checkpoint is ' + kept[-1].name if kept else 'no checkpoint was written yet'}. "
                f"Lower the learning rate (now {config.lr:g}) or use fp32/bf16 instead of fp16, then resume (command "
                "line: --resume --lr; web app: Runs, 'Learning rate from here', Resume selected run) or restart"
            )

    retry_oom = checkpointing_plan(config.gradient_checkpointing, base.device, dist.world)[1]

    def enable_checkpointing() -> None:
        nonlocal retry_oom
        retry_oom = False  # once: a second out-of-memory is a real one
        denoiser.enable_gradient_checkpointing()
        emit(ev.Log(message="out of GPU memory without gradient checkpointing: turned it on and redid the step "
                            "(gradient_checkpointing: auto; set it to on to skip the failed try)"))

    parts = StepParts(handler=base.handler, pipe=base.pipe, denoiser=denoiser, forward=forward,
                      noise_scheduler=noise_scheduler, optimizer=optimizer, lr_scheduler=lr_scheduler, params=params,
                      generator=generator, dist=dist, grad_accum=config.grad_accum,
                      max_grad_norm=config.max_grad_norm, attention=config.attention, scaler=scaler,
                      compute_dtype=torch.bfloat16 if config.adapter_dtype == "bf16" else None, objective=objective)
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=config.steps, initial=start_step, desc=run_dir.name, unit="step", dynamic_ncols=True)
    step = start_step
    last_loss: Optional[float] = None
    denoiser.train()
    try:
        if config.eval_every and start_step == 0:  # where the curve starts (a resumed run has this point already)
            evaluate(0)
        while step < config.steps and not dist.any(stop.is_set()):
            t0 = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step trains with (the step advances the schedule)
            total, _ = train_step(parts, fetch, step, check=lambda loss, norm: require_finite(loss, norm, step),
                                  on_oom=enable_checkpointing if retry_oom else None)
            step += 1
            emit(ev.Step(step=step, total_steps=config.steps, loss=total, lr=lr,
                         seconds=time.perf_counter() - t0))
            last_loss = total
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{total:.4f}")
            due_eval = config.eval_every and (step % config.eval_every == 0 or step == config.steps)
            due_sample = config.sample_every and step % config.sample_every == 0
            # a stop asked for skips them (Ctrl-C on several processes leaves torchrun's grace time for the exports);
            # decided together, as under FSDP every process must render and evaluate or none
            stopping = (due_eval or due_sample) and dist.any(stop.is_set())
            if due_eval and not stopping:
                evaluate(step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step)
            if due_sample and not stopping:
                sample(step)
    finally:
        if progress is not None:
            progress.close()

    stopped = step < config.steps
    if stopped and step == 0:  # stopped before its first step: an untrained adapter is nothing to keep
        emit(ev.Stopped(step=0))
        emit(ev.Log(message="stopped before the first step: no checkpoint and no exports were written"))
        return RunResult(step=0, stopped=True, exports=())
    if saved_at != step:
        checkpoint(step)
    adapter = dist.full_state(adapted_state(denoiser))  # every process: under FSDP this gathers the shards
    dist.barrier()
    if not dist.is_main:
        return RunResult(step=step, stopped=stopped, exports=())
    weights = from_peft_state_dict(adapter, config.rank, config.alpha)
    exports = export_lora(run_dir, weights, replace(info, steps=step), base.handler.peft_prefix, flux_dims(base))
    paths = tuple(str(p) for p in exports)
    emit(ev.Stopped(step=step) if stopped else ev.Done(step=step, exports=paths))
    if stopped:
        emit(ev.Log(message=f"exports written: {', '.join(Path(p).name for p in paths)}"))
    return RunResult(step=step, stopped=stopped, exports=paths)


def _restore(checkpoint: Path, config: TrainConfig, denoiser, optimizer, lr_scheduler, generator: torch.Generator,
             scaler, emit: ev.Emit) -> tuple[int, float]:
    """Load a checkpoint into the run's adapter, optimizer, schedule, generator and scaler; returns its step and
    the peak learning rate the steps so far trained with (a resume may change it)."""
    from peft.utils import set_peft_model_state_dict

    state = load_checkpoint(checkpoint)
    try:
        set_peft_model_state_dict(denoiser, state.adapter, adapter_name=ADAPTER)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError):
        raise ConfigError([f"checkpoint {checkpoint.name} does not fit this run's config.yaml (rank "
                           f"{config.rank}, targets {config.targets}): the file was edited after the run "
                           "started; put back the values it was trained with, or start a new run"]) from None
    lr_scheduler.load_state_dict(state.lr_scheduler)
    trained_at = lr_scheduler.base_lrs[0]
    for note in continue_schedule(optimizer, lr_scheduler, config.lr):
        emit(ev.Log(message=note))
    generator.set_state(state.generator)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    return state.step, trained_at


def _export_info(config: TrainConfig, base: LoadedBase, run_dir: Path, examples: list[Example], started_at: float,
                 world: int, resumed: Optional[tuple[float, int]]) -> ExportInfo:
    """What the exports record (kohya's ss_* keys, modelspec, the studio's own). ``resumed``: the peak rate the
    earlier steps trained with and the step resumed at, None for a new run."""
    groups = {ex.source: Path(ex.source).parent.name for ex in examples}
    info = ExportInfo(
        arch=base.arch, modelspec_architecture=base.handler.modelspec_architecture,
        base_model_version=base.handler.base_model_version, base=config.base, base_sha256=base_fingerprint(base),
        resolution=config.resolution, output_name=run_dir.name, title=config.title or run_dir.name,
        trigger=config.trigger, license=config.license, description=config.description, targets=config.targets,
        started_at=started_at, image_count=len(examples), data_sha256=dataset_hash(examples),
        tag_frequency=tag_frequency(examples, groups), training=training_record(config, world),
    )
    if resumed is None:
        return info
    trained_at, start_step = resumed  # kohya's ss_learning_rate holds one rate: the changes are kept beside it
    earlier = load_export_info(run_dir)
    history = learning_rates((earlier.training if earlier else {}).get(LR_HISTORY, ""), trained_at, config.lr,
                             start_step)
    if history:
        info = replace(info, training={**info.training, LR_HISTORY: history})
    if earlier is not None and earlier.started_at:  # ss_training_started_at: when the run began, not resumed
        info = replace(info, started_at=earlier.started_at)
    return info


def adapted_state(denoiser) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=ADAPTER)


def base_fingerprint(base: LoadedBase) -> str:
    """sha256 of the denoiser weights (single file, or the folder's denoiser shards); empty for hub ids."""
    import hashlib

    from trainer.paths import sha256_file

    ref = base.ref
    if ref.kind == "file":
        files = [Path(ref.value)]
    elif ref.kind in ("folder", "demo", "demo-random"):
        from trainer.models import demo_folder

        folder = Path(ref.value) if ref.kind == "folder" else demo_folder(ref)
        files = sorted((folder / base.handler.denoiser_attr).glob("*.safetensors"))
    else:
        return ""
    if len(files) == 1:
        return sha256_file(files[0])
    combined = hashlib.sha256("".join(sha256_file(p) for p in files).encode())  # sharded weights
    return combined.hexdigest() if files else ""
