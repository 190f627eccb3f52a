"""Speed and memory benchmarks of the training step and of sampling with LoRAs (issue 7).

Full-size SD1.5 / SDXL / FLUX.1-dev architectures are built from configs with random
weights (:mod:`benchmarks.archs`), so nothing is downloaded. Our step (what
``trainer/loop.py`` does, :mod:`benchmarks.ours`) runs side by side with the plain
diffusers-example step (:mod:`benchmarks.reference`); :mod:`benchmarks.inference`
times sampling with 0/1/3 LoRAs, fused mixes, slider re-weights and file loads;
:mod:`benchmarks.harness` times them and writes JSON + markdown. A CPU ``--smoke`` mode
runs the same code on the tiny test models; it exists to keep the harness working,
never to report speed. Entry point: ``python -m trainer bench`` (:mod:`trainer.cli_bench`).
"""
