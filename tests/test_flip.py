"""Flip augmentation: both orientations are encoded once, and each step picks one per image from the run's generator."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trainer.data import BatchPlan, prepare
from trainer.scan import scan_dataset
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


def test_sdxl_conditions_a_mirrored_crop_on_its_own_corner(base_dirs, tmp_path):
    """Wide images, randomly cropped: the mirrored crop starts as far from the left as the crop did from the right."""
    import numpy as np
    from PIL import Image

    from trainer.loop import build_cache

    for i in range(3):
        Image.fromarray(np.full((64, 192, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"wide{i}.png")
    examples, _ = prepare(scan_dataset(tmp_path), 64, False, "", seed=2)
    cache = build_cache(load_base(str(base_dirs["sdxl"]), "fp32", "cpu"), examples, mirrored=True)
    corners = []
    for ex, extra, mirrored in zip(examples, cache.extra, cache.mirrored_extra):
        left = ex.crop_top_left[1]
        assert ex.excess_width == 128 and extra["time_ids"][3].item() == left
        assert mirrored["time_ids"][3].item() == 128 - left
        corners.append(left)
    assert any(left != 64 for left in corners)  # a random crop off-centre: the two corners differ


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
