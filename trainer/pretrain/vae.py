"""Train the shared demo autoencoder (64 px RGB <-> 16x16x4 latents).

A KL-VAE whose posterior std starts near 1 trains very slowly (the prototype
stalled at ~16 dB PSNR). This one is a near-deterministic autoencoder inside
the ordinary ``AutoencoderKL`` class: the log-variance outputs are pinned at
-30 and only the mean is trained. Small relative noise is added to the latents
before decoding, so the decoder tolerates the imperfect latents a denoiser
produces. ``scaling_factor`` (and FLUX's ``shift_factor``) are measured on the
trained latents so they come out with unit variance, as SD expects.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.atomic import atomic_path
from trainer.pretrain import models
from trainer.pretrain.data import render_pool, to_pixels

LATENT_NOISE = 0.05  # relative std of the latent noise during training


def new_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = models.vae()
    conv = vae.encoder.conv_out
    c = models.LATENT_CHANNELS
    with torch.no_grad():
        conv.weight[c:].zero_()
        conv.bias[c:].fill_(-30.0)  # log-variance: std ~ 3e-7, i.e. deterministic
    conv.weight.register_hook(lambda g: torch.cat([g[:c], torch.zeros_like(g[c:])]))
    conv.bias.register_hook(lambda g: torch.cat([g[:c], torch.zeros_like(g[c:])]))
    return vae


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.mode()


@torch.no_grad()
def psnr(vae, images_uint8: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB, 0..255 scale) of encode -> decode on the given images."""
    vae.eval()
    values = []
    for start in range(0, len(images_uint8), batch):
        x = to_pixels(images_uint8[start:start + batch])
        y = vae.decode(encode(vae, x)).sample.clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values += (-10 * torch.log10(mse)).tolist()
    return float(sum(values) / len(values))


@torch.no_grad()
def latent_stats(vae, images_uint8: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    zs = [encode(vae, to_pixels(images_uint8[s:s + batch])) for s in range(0, len(images_uint8), batch)]
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def train_vae(out: Path, minutes: float, device: str = "cpu", seed: int = 0, batch: int = 32, pool: int = 8000,
              lr: float = 1e-3, log=print) -> dict:
    """Train (or resume) the autoencoder in ``out``; writes ``out/vae`` and ``out/vae_state.pt``.

    Returns a summary with held-out PSNR and latent statistics.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "vae_state.pt"
    images, _ = render_pool(pool, seed=seed + 101, styled=0.25)
    held = min(256, pool)
    held_out, _ = render_pool(held, seed=seed + 999, styled=0.25)
    vae = new_vae(seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step, spent = 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, spent = int(state["step"]), float(state["seconds"])
        log(f"vae: resumed at step {step} ({spent / 60:.1f} min spent)")
    budget = minutes * 60
    rng = random.Random(seed + step)
    from tqdm import tqdm

    bar = tqdm(total=int(budget), initial=int(min(spent, budget)), unit="s", desc="vae", dynamic_ncols=True)
    last_save = time.time()
    vae.train()
    while spent < budget:
        t0 = time.time()
        idx = torch.tensor([rng.randrange(len(images)) for _ in range(batch)])
        x = to_pixels(images[idx]).to(device)
        if rng.random() < 0.5:  # flips are fine for an autoencoder (captions do not matter here)
            x = x.flip(-1)
        frac = spent / budget
        for g in opt.param_groups:  # cosine decay to 5 % over the time budget
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        z = encode(vae, x)
        noisy = z + LATENT_NOISE * z.detach().std() * torch.randn_like(z)
        y = vae.decode(noisy).sample
        loss = F.mse_loss(y, x) + 0.1 * F.l1_loss(y, x) + 1e-2 * z.mean(dim=(0, 2, 3)).pow(2).mean() / z.detach().var()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        dt = time.time() - t0
        spent += dt
        bar.update(int(spent) - bar.n if int(spent) > bar.n else 0)
        bar.set_postfix(loss=f"{loss.item():.4f}", step=step)
        if step % 50 == 0:
            with open(out / "vae_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "seconds": round(spent, 1), "loss": loss.item()}) + "\n")
        if time.time() - last_save > 120 or spent >= budget:
            _save_state(vae, opt, step, spent, state_path)
            last_save = time.time()
    bar.close()
    _save_state(vae, opt, step, spent, state_path)
    vae = vae.cpu().eval()
    value = psnr(vae, held_out)
    mean, std = latent_stats(vae, images[:2048])
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    plain, _ = render_pool(held, seed=seed + 998, styled=0.0)
    summary = {"steps": step, "minutes": round(spent / 60, 2), "psnr_db": round(value, 2),
               "psnr_plain_db": round(psnr(vae, plain), 2), "latent_mean": mean, "latent_std": std, "seed": seed,
               "params": models.count_parameters(vae)}
    (out / "vae_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"vae: {summary}")
    return summary


def _save_state(vae, opt, step: int, spent: float, state_path: Path) -> None:
    """The resume state, atomically: an interrupted save must not cost the only copy."""
    with atomic_path(state_path) as tmp:
        torch.save({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step, "seconds": spent}, tmp)


def finetune_decoder(work: Path, minutes: float, device: str = "cpu", seed: int = 0, batch: int = 16,
                     pool: int = 4000, lr: float = 1e-3, log=print) -> dict:
    """Keep training only the decoder (``work/vae_decoder``), with the encoder frozen.

    The latents do not change, so this can run while the denoisers train on them;
    :func:`trainer.pretrain.train.export` ships the fine-tuned decoder when it exists.
    """
    from diffusers import AutoencoderKL

    work = Path(work)
    src = work / "vae_decoder" if (work / "vae_decoder" / "config.json").is_file() else work / "vae"
    vae = AutoencoderKL.from_pretrained(src).to(device)
    vae.encoder.requires_grad_(False)
    images, _ = render_pool(pool, seed=seed + 101, styled=0.25)
    held_out, _ = render_pool(256, seed=seed + 999, styled=0.25)
    before = psnr(vae, held_out)
    with torch.no_grad():
        latents = torch.cat([encode(vae, to_pixels(images[s:s + 256]).to(device)) for s in range(0, pool, 256)])
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed + 5)
    spent, step, budget, last_save = 0.0, 0, minutes * 60, time.time()
    vae.decoder.train()

    def save():
        vae.save_pretrained(work / "vae_decoder.tmp", safe_serialization=True)
        import shutil

        shutil.rmtree(work / "vae_decoder", ignore_errors=True)
        (work / "vae_decoder.tmp").rename(work / "vae_decoder")

    while spent < budget:
        t0 = time.time()
        idx = torch.tensor([rng.randrange(pool) for _ in range(batch)])
        z, x = latents[idx], to_pixels(images[idx]).to(device)
        for g in opt.param_groups:
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(spent / budget, 1.0))))
        y = vae.decode(z + LATENT_NOISE * z.std() * torch.randn_like(z)).sample
        loss = F.mse_loss(y, x) + 0.1 * F.l1_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        step += 1
        spent += time.time() - t0
        if step % 50 == 0:
            with open(work / "vae_decoder_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "seconds": round(spent, 1), "loss": loss.item()}) + "\n")
        if time.time() - last_save > 300:
            save()
            last_save = time.time()
    vae.eval()
    save()
    summary = {"decoder_steps": step, "minutes": round(spent / 60, 2), "psnr_before_db": round(before, 2),
               "psnr_db": round(psnr(vae, held_out), 2)}
    (work / "vae_decoder_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"decoder: {summary}")
    return summary
