"""Flip augmentation: both orientations are encoded once, and each step picks one per image from the run's generator."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trainer.data import BatchPlan, prepare, scan_dataset
from trainer.distributed import Dist
from trainer.models import load_base

SD_ARCHS = ("sd15", "sdxl")


@pytest.fixture(scope="module")
def cached(base_dirs, scene_dir):
    """Per SD architecture: (base, examples, cache with mirrored latents)."""
    from trainer.loop import build_cache

    examples, _ = prepare(scan_dataset(scene_dir), 64, False, "", seed=1)
    out = {}
    for arch in SD_ARCHS:
        base = load_base(str(base_dirs[arch]), "fp32", "cpu")
        out[arch] = (base, examples, build_cache(base, examples, mirrored=True))
    return out


@pytest.mark.parametrize("arch", SD_ARCHS)
def test_the_cache_holds_the_latents_of_the_mirrored_images(cached, arch):
    base, examples, cache = cached[arch]
    pixels = torch.stack([ex.pixels for ex in examples[:2]])
    expected = base.handler.encode_image(base.pipe, pixels.flip(-1))
    for i in range(2):
        torch.testing.assert_close(cache.mirrored[i], expected[i])
        # a VAE is not mirror-symmetric: flipping the latent would be a different (wrong) image
        assert not torch.allclose(cache.mirrored[i], cache.latents[i].flip(-1), atol=1e-3)
    if arch == "sdxl":  # the crop corner in time_ids is the mirrored image's
        for ex, extra, mirrored in zip(examples, cache.extra, cache.mirrored_extra):
            assert extra["time_ids"][3].item() == ex.crop_top_left[1]
            assert mirrored["time_ids"][3].item() == ex.excess_width - ex.crop_top_left[1]


@pytest.mark.parametrize("arch", SD_ARCHS)
def test_each_step_shows_each_image_one_way_about_half_the_time(cached, arch):
    from trainer.loop import _batch

    base, examples, cache = cached[arch]
    plan = BatchPlan(examples, batch_size=2, seed=3)
    config = tiny_config("demo:sd15", "data", "out", flip=True, batch_size=2)
    generator = torch.Generator().manual_seed(5)
    shown = []
    for index in range(40):
        latents, cond = _batch(cache, plan, index, config, examples, generator, torch.device("cpu"), Dist())
        for row, i in enumerate(plan.batch(index)):
            mirrored = torch.equal(latents[row], cache.mirrored[i])
            assert mirrored or torch.equal(latents[row], cache.latents[i])
            if arch == "sdxl":
                extra = cache.mirrored_extra[i] if mirrored else cache.extra[i]
                assert torch.equal(cond["time_ids"][row], extra["time_ids"])
            shown.append(mirrored)
    assert 0.3 < sum(shown) / len(shown) < 0.7


def test_flip_off_draws_nothing_for_it(cached):
    """A run without flips draws from the generator exactly what it drew before flips existed."""
    from trainer.loop import _batch

    base, examples, cache = cached["sd15"]
    plan = BatchPlan(examples, batch_size=2, seed=3)
    for flip, draws in ((False, 1), (True, 2)):  # caption dropout, then (flip on) the flips
        generator = torch.Generator().manual_seed(5)
        latents, _ = _batch(cache, plan, 0, tiny_config("demo:sd15", "data", "out", flip=flip, batch_size=2), examples,
                            generator, torch.device("cpu"), Dist())
        replay = torch.Generator().manual_seed(5)
        for _ in range(draws):
            torch.rand(2, generator=replay)
        assert torch.equal(generator.get_state(), replay.get_state())
        if not flip:
            assert torch.equal(latents, torch.stack([cache.latents[i] for i in plan.batch(0)]))
