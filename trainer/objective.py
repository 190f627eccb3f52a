"""Options of the SD1.5/SDXL training objective, kept free of torch so the web app can check them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import ConfigError


@dataclass(frozen=True)
class Objective:
    """Options of the noise-prediction loss that kohya's scripts and diffusers' examples offer (all off by default).

    ``noise_offset``: the noise gets ``offset · N(0, 1)`` per image and channel on top. Per-pixel noise barely
    moves a latent's channel means (their variance is 1/(h·w)), so a model learns to keep each image's mean
    brightness; the offset lets a style reach darker darks and brighter brights.

    ``snr_gamma``: Min-SNR-γ weighting (Hang et al. 2023), each sample's loss weighted by min(SNR, γ)/SNR
    (ε-prediction) or min(SNR, γ)/(SNR + 1) (v-prediction), so the low-noise timesteps, whose targets are
    easy, stop dominating the gradient.
    """

    noise_offset: float = 0.0
    snr_gamma: float = 0.0

    @property
    def plain(self) -> bool:
        return self.noise_offset == 0 and self.snr_gamma == 0


def check_objective(arch: str | None, objective: Objective) -> None:
    """Refuse the SD options for FLUX, whose flow-matching loss has neither ε-noise offsets nor an SNR weighting."""
    if arch == "flux" and not objective.plain:
        raise ConfigError([f"noise_offset={objective.noise_offset:g}, snr_gamma={objective.snr_gamma:g}: these shape "
                           "SD1.5/SDXL's noise-prediction loss; FLUX trains with flow matching, so set both to 0"])
