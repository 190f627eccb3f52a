"""Pretrain a demo base: autoencoder, then text encoder(s) + denoiser jointly, from scratch.

Work happens in a work folder (resumable; re-running the same command continues):

    WORK/vae/, vae_state.pt     the shared autoencoder (trained once for all archs)
    WORK/pool.pt, latents.pt    rendered scenes + captions, and their cached latents
    WORK/<arch>/state.pt        denoiser + text encoders + optimizer, every 2 minutes
    WORK/<arch>/loss.jsonl      the loss log

The objective is the one the LoRA trainer uses (``ARCH_HANDLERS[arch].loss``),
so a demo base is trained exactly as a LoRA on it will be: SD1.5/SDXL predict v
on a zero-terminal-SNR DDPM schedule, FLUX predicts ``noise - latents`` on
uniform flow-matching times. Captions are dropped (-> "") 10 % of the time for
classifier-free guidance, and 10 % get a trigger or junk word in front.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from trainer.atomic import atomic_path
from trainer.errors import UserError
from trainer.pretrain import models
from trainer.pretrain.data import augment_caption, render_pool, to_pixels

CFG_DROPOUT = 0.1
SAVE_EVERY_S = 120
LINEAGE = "earlier_training.json"  # in WORK/<arch>/: what the --init-from base had been trained for
# Sampling defaults written to studio.json (measured: docs/demo-bases.md)
# and the LoRA learning-rate scale (a 64-wide model needs ~10x the presets' SD/FLUX rates).
# sd15/sdxl sample with little or no CFG: guidance amplifies a style LoRA's k/v change into
# wrong, saturated colours on these tiny bases, while 1-1.5 keeps prompt following (bg 100 %).
# FLUX (no guidance embeds) uses true CFG; 2.0 is the swept value the shipped studio.json holds.
DEFAULTS = {
    "sd15": {"steps": 20, "guidance": 1.0, "lora_lr_scale": 30},
    "sdxl": {"steps": 20, "guidance": 1.5, "lora_lr_scale": 10},
    "flux": {"steps": 20, "guidance": 1.0, "true_cfg_scale": 2.0, "negative_prompt": "", "lora_lr_scale": 10},
}


# ---------------------------------------------------------------- data
def scene_latents(work: Path, vae, n: int, seed: int, device: str, log=print) -> tuple[torch.Tensor, list[str]]:
    """Raw (unscaled) latents of ``n`` rendered scenes, cached in ``work``."""
    path = work / "latents.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if len(cached["captions"]) >= n:
            return cached["latents"][:n].float(), cached["captions"][:n]
    pool_path = work / "pool.pt"
    pool = torch.load(pool_path, weights_only=False) if pool_path.is_file() else None
    if pool is None or len(pool["captions"]) < n:
        log(f"rendering {n} scenes ...")
        images, captions = render_pool(n, seed=seed + 7)
        with atomic_path(pool_path) as tmp:
            torch.save({"images": images, "captions": captions}, tmp)
    else:
        images, captions = pool["images"][:n], pool["captions"][:n]
    log(f"encoding {n} scenes ...")
    vae = vae.to(device).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, n, 256):
            x = to_pixels(images[start:start + 256]).to(device)
            chunks.append(vae.encode(x).latent_dist.mode().cpu().half())
    latents = torch.cat(chunks)
    with atomic_path(path) as tmp:
        torch.save({"latents": latents, "captions": captions}, tmp)
    return latents.float(), captions


# ---------------------------------------------------------------- text, with gradients
def _ids(tokenizer, captions: list[str], length: int, device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_text(arch: str, pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
    """The conditioning the pipeline computes in ``encode_prompt``, but differentiable."""
    if arch == "sd15":
        ids = _ids(pipe.tokenizer, captions, pipe.tokenizer.model_max_length, device)
        return {"encoder_hidden_states": pipe.text_encoder(ids)[0]}
    if arch == "sdxl":  # penultimate hidden states of both encoders, pooled output of the second
        embeds, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            out = encoder(_ids(tokenizer, captions, tokenizer.model_max_length, device), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        size = models.RESOLUTION
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
        return {"encoder_hidden_states": torch.cat(embeds, -1), "text_embeds": pooled,
                "time_ids": time_ids.expand(len(captions), -1)}
    if arch == "flux":
        clip_ids = _ids(pipe.tokenizer, captions, pipe.tokenizer.model_max_length, device)
        t5_ids = _ids(pipe.tokenizer_2, captions, pipe.tokenizer_2.model_max_length, device)
        return {"pooled_projections": pipe.text_encoder(clip_ids).pooler_output,
                "encoder_hidden_states": pipe.text_encoder_2(t5_ids)[0]}
    raise ValueError(arch)


def scale_latents(arch: str, raw: torch.Tensor, vae_config) -> torch.Tensor:
    """As ``ARCH_HANDLERS[arch].encode_image`` scales them (FLUX also shifts)."""
    if arch == "flux":
        return (raw - vae_config.shift_factor) * vae_config.scaling_factor
    return raw * vae_config.scaling_factor


# ---------------------------------------------------------------- training
def _trainable(arch: str, pipe) -> torch.nn.ModuleDict:
    from trainer.models import ARCH_HANDLERS

    handler = ARCH_HANDLERS[arch]
    parts = {"denoiser": getattr(pipe, handler.denoiser_attr)}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            parts[name] = getattr(pipe, name)
    return torch.nn.ModuleDict(parts)


def pretrain(arch: str, out: Path, work: Path, minutes: float, device: str = "cpu", seed: int = 0,
             batch: int = 32, lr: float = 1e-3, pool: int = 16000, vae_minutes: float = 10.0, vae_pool: int = 4000,
             init_from: Path | None = None, log=print) -> dict:
    """Train (or resume) the ``arch`` demo base in ``work`` and write the diffusers folder ``out``.

    ``minutes`` is the denoiser's time budget (the autoencoder's is ``vae_minutes``,
    spent only once per work folder). ``init_from`` (a demo base folder of the same
    arch, e.g. the shipped one) continues training from its weights in a fresh work
    folder: its autoencoder becomes the work folder's, so its latents stay valid.
    Returns the run summary.
    """
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from trainer.models import ARCH_HANDLERS
    from trainer.pretrain.vae import train_vae

    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    if init_from is not None and not (work / "vae" / "config.json").is_file():
        _adopt_autoencoder(arch, Path(init_from), work)
    if not (work / "vae" / "config.json").is_file():
        train_vae(work, vae_minutes, device=device, seed=seed, pool=vae_pool, batch=16, lr=3e-3, log=log)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    raw, captions = scene_latents(work, vae, pool, seed, device, log)
    torch.manual_seed(seed)
    pipe = models.build_pipeline(arch, vae)
    handler = ARCH_HANDLERS[arch]
    latents_all = scale_latents(arch, raw, vae.config)
    trainable = _trainable(arch, pipe).to(device)
    opt = torch.optim.AdamW(trainable.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    run = work / arch
    run.mkdir(exist_ok=True)
    state_path = run / "state.pt"
    if init_from is not None and not (run / LINEAGE).is_file():
        _record_lineage(Path(init_from), run / LINEAGE)
    step, spent = 0, 0.0
    generator = torch.Generator().manual_seed(seed)
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        trainable.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, spent = int(state["step"]), float(state["seconds"])
        generator.set_state(state["generator"])
        log(f"{arch}: resumed at step {step} ({spent / 60:.1f} min spent)")
    elif init_from is not None:
        _load_weights(arch, pipe, Path(init_from), log)
        log(f"{arch}: starting from the weights in {init_from}")
    rng = random.Random(seed * 1000 + step)
    noise_scheduler = handler.training_scheduler(pipe)
    budget = minutes * 60
    warmup = 30

    def save():  # atomically: a second Ctrl-C or a full disk mid-save must not cost the only resume state
        with atomic_path(state_path) as tmp:
            torch.save({"model": trainable.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "seconds": spent, "generator": generator.get_state()}, tmp)

    bar = tqdm(total=int(budget), initial=int(min(spent, budget)), unit="s", desc=f"{arch} ({minutes:g} min)",
               dynamic_ncols=True)
    last_save = time.time()
    trainable.train()
    vae.requires_grad_(False)
    log_file = open(run / "loss.jsonl", "a")
    try:
        while spent < budget:
            t0 = time.time()
            idx = torch.randint(0, len(captions), (batch,), generator=generator)
            texts = ["" if rng.random() < CFG_DROPOUT else augment_caption(captions[i], rng) for i in idx.tolist()]
            frac = min(spent / budget, 1.0)
            for g in opt.param_groups:  # linear warmup, then cosine over the time budget down to 2 %
                g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
            cond = encode_text(arch, pipe, texts, device)
            loss = handler.loss(pipe, handler_denoiser(pipe, arch), noise_scheduler, latents_all[idx].to(device),
                                cond, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
            opt.step()
            step += 1
            spent += time.time() - t0
            if int(spent) > bar.n:
                bar.update(int(spent) - bar.n)
            bar.set_postfix(loss=f"{loss.item():.4f}", step=step)
            log_file.write(json.dumps({"step": step, "seconds": round(spent, 1), "loss": round(loss.item(), 5),
                                       "lr": opt.param_groups[0]["lr"]}) + "\n")
            if time.time() - last_save > SAVE_EVERY_S:
                save()
                log_file.flush()
                last_save = time.time()
    finally:
        bar.close()
        log_file.close()
        save()
    summary = export(arch, pipe, out, work, steps=step, seconds=spent, seed=seed)
    log(f"{arch}: wrote {out} after {step} steps ({spent / 60:.1f} min)")
    return summary


def _adopt_autoencoder(arch: str, folder: Path, work: Path) -> None:
    """Copy ``folder``'s autoencoder into ``work``; the work folder's VAE needs FLUX's
    ``shift_factor`` (the latent mean) whatever the arch, so an SD folder gets it measured."""
    from diffusers import AutoencoderKL

    if not (folder / "vae" / "config.json").is_file():
        raise UserError(f"--init-from {folder}: no vae/ folder there; pass a demo base folder such as demo_models/{arch}")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    if vae.config.shift_factor is None:
        images, _ = render_pool(512, seed=12345)
        with torch.no_grad():
            mean = vae.encode(to_pixels(images)).latent_dist.mode().mean().item()
        vae.register_to_config(shift_factor=mean)
    vae.save_pretrained(work / "vae", safe_serialization=True)
    for name in ("vae_summary.json", "vae_decoder_summary.json"):
        (work / name).unlink(missing_ok=True)
    studio = folder / "studio.json"
    if studio.is_file():
        psnr = json.loads(studio.read_text()).get("vae_psnr_db")
        (work / "vae_summary.json").write_text(json.dumps({"psnr_db": psnr, "adopted_from": str(folder)}) + "\n")


# Parts of earlier demo architectures that a continued run may leave behind (the sd15 UNet's
# pooled-text embedding, used by the shipped base's stages 1-2).
_RETIRED_PREFIXES = ("add_embedding.",)


def _load_weights(arch: str, pipe, folder: Path, log=print) -> None:
    """Denoiser and text encoder weights of the demo base in ``folder`` (same architecture, or an
    earlier one that differs only by retired parts, which are dropped)."""
    import diffusers

    try:
        trained = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"--init-from {folder}: cannot load it as a {arch} demo base ({err})") from None
    for name in _trainable(arch, pipe):
        attr = handler_denoiser_attr(arch) if name == "denoiser" else name
        module, state = getattr(pipe, attr), getattr(trained, attr).state_dict()
        dropped = sorted(k for k in state if k.startswith(_RETIRED_PREFIXES))
        if dropped and not any(k.startswith(_RETIRED_PREFIXES) for k in module.state_dict()):
            state = {k: v for k, v in state.items() if k not in dropped}
            log(f"{arch}: {folder} has the retired pooled-text path ({len(dropped)} tensors); continuing without it")
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise UserError(f"--init-from {folder}: its {attr} does not match the {arch} demo architecture "
                            f"({first}); start from scratch without --init-from") from None


def _record_lineage(folder: Path, path: Path) -> None:
    """Keep the training history of the base that ``--init-from`` continues (its studio.json), for the export."""
    try:
        earlier = json.loads((folder / "studio.json").read_text())
    except (OSError, ValueError):
        earlier = {}
    history = list(earlier.get("earlier_training", []))
    if "train_steps" in earlier:
        history.append({k: earlier[k] for k in ("train_steps", "train_minutes", "seed") if k in earlier})
    path.write_text(json.dumps(history) + "\n")


def handler_denoiser_attr(arch: str) -> str:
    return "transformer" if arch == "flux" else "unet"


def handler_denoiser(pipe, arch: str):
    return pipe.transformer if arch == "flux" else pipe.unet


def load_in_fp32_by_default(folder: Path) -> None:
    """The weights stay fp16 on disk (half the size), but a plain ``from_pretrained`` of the folder must load in
    one dtype: diffusers loads the UNet/transformer and VAE in fp32, while transformers 5 loads a text encoder in
    the dtype its config names, and the pipeline then fails on fp16 text features meeting fp32 layers."""
    for config in sorted(folder.glob("text_encoder*/config.json")):
        values = json.loads(config.read_text())
        if values.get("dtype") not in (None, "float32"):
            values["dtype"] = "float32"
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def export(arch: str, pipe, out: Path, work: Path, steps: int, seconds: float, seed: int) -> dict:
    """Save ``pipe`` as an fp16 diffusers folder plus ``studio.json`` (sampling defaults, provenance)."""
    import shutil

    from diffusers import AutoencoderKL

    decoder = work / "vae_decoder"
    if (decoder / "config.json").is_file():  # same encoder (same latents), a longer-trained decoder
        pipe.vae.decoder.load_state_dict(AutoencoderKL.from_pretrained(decoder).decoder.state_dict())
    if arch != "flux":
        pipe.vae.register_to_config(shift_factor=None)  # SD pipelines do not shift latents
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to("cpu", torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    load_in_fp32_by_default(tmp)
    vae_summary = {}
    for name in ("vae_summary.json", "vae_decoder_summary.json"):  # the decoder's PSNR, when fine-tuned, wins
        if (work / name).is_file():
            vae_summary.update(json.loads((work / name).read_text()))
    summary = {"arch": arch, **DEFAULTS[arch], "trigger_tokens": list(models.TRIGGERS), "train_steps": steps,
               "train_minutes": round(seconds / 60, 1), "train_seconds": round(seconds, 2), "seed": seed, "vae_psnr_db": vae_summary.get("psnr_db"),
               "denoiser_params": models.count_parameters(handler_denoiser(pipe, arch))}
    if (work / arch / LINEAGE).is_file():  # continued from an earlier base (--init-from): its training came first
        summary["earlier_training"] = json.loads((work / arch / LINEAGE).read_text())
    (tmp / "studio.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary
