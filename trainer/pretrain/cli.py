"""``python -m trainer pretrain-demo``: train a tiny demo base from scratch and write it as a diffusers folder.

Re-running the same command resumes from the work folder's last state (saved
every 2 minutes); a larger ``--minutes`` continues training, the same value just
re-exports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=("sd15", "sdxl", "flux"), required=True)
    parser.add_argument("--out", required=True, help="diffusers folder to write (e.g. demo_models/sd15)")
    parser.add_argument("--work", default="outputs/pretrain-demo",
                        help="resumable state: shared autoencoder, cached latents, per-arch checkpoints")
    parser.add_argument("--minutes", type=float, default=30.0, help="denoiser training time budget")
    parser.add_argument("--vae-minutes", type=float, default=10.0,
                        help="autoencoder time budget (spent once per work folder, shared by all archs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=16000, help="number of rendered training scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None,
                        help="start from this demo base folder's weights (e.g. demo_models/sd15) in a fresh --work "
                             "folder, to train the shipped base further")
    parser.add_argument("--decoder-minutes", type=float, default=0.0,
                        help="instead of training --arch: train only the work folder's decoder for this long "
                             "(encoder frozen, so cached latents stay valid; can run beside the denoisers)")


def run(args: argparse.Namespace) -> int:
    import torch

    from trainer.pretrain.train import pretrain

    if args.minutes <= 0 or args.vae_minutes <= 0:
        raise UserError("--minutes and --vae-minutes must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decoder_minutes > 0:
        from trainer.pretrain.vae import finetune_decoder

        if not (Path(args.work) / "vae" / "config.json").is_file():
            raise UserError(f"{args.work} has no trained autoencoder yet; run pretrain-demo without --decoder-minutes first")
        summary = finetune_decoder(Path(args.work), args.decoder_minutes, device=args.device, seed=args.seed)
        print(f"decoder fine-tuned: held-out PSNR {summary['psnr_before_db']} -> {summary['psnr_db']} dB; "
              f"re-run pretrain-demo for each arch to export it")
        return 0
    summary = pretrain(args.arch, Path(args.out), Path(args.work), args.minutes, device=args.device, seed=args.seed,
                       batch=args.batch_size, lr=args.lr, pool=args.pool, vae_minutes=args.vae_minutes,
                       init_from=Path(args.init_from) if args.init_from else None)
    print(f"wrote the {args.arch} demo base to {args.out} ({summary['train_steps']} steps, "
          f"{summary['train_minutes']} min); load it with --base {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:  # until the lead wires it into trainer/__main__.py
    parser = argparse.ArgumentParser(prog="python -m trainer.pretrain.cli")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
