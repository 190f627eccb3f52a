"""Options of the training objective, kept free of torch so the web app can check them cheaply."""

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

    ``timestep_sampling`` (FLUX): ``uniform``, or ``logit_normal``: t = sigmoid(N(0, 1)), the SD3 paper's
    choice for rectified flow (Esser et al. 2024), which spends more steps at mid noise levels where the
    velocity is hardest to predict and fewer at the ends.
    """

    noise_offset: float = 0.0
    snr_gamma: float = 0.0
    timestep_sampling: str = "uniform"

    @classmethod
    def of(cls, config) -> "Objective":
        """The objective a ``TrainConfig`` asks for."""
        return cls(noise_offset=config.noise_offset, snr_gamma=config.snr_gamma,
                   timestep_sampling=config.timestep_sampling)

    @property
    def shapes_noise_prediction(self) -> bool:
        """Whether an SD1.5/SDXL-only option is on."""
        return self.noise_offset != 0 or self.snr_gamma != 0


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_objective(arch: str | None, objective: Objective) -> None:
    """Refuse options that the architecture's loss does not have (``arch`` None: not known yet, nothing refused)."""
    if arch == "flux" and objective.shapes_noise_prediction:
        raise ConfigError([f"noise_offset={objective.noise_offset:g}, snr_gamma={objective.snr_gamma:g}: these shape "
                           "SD1.5/SDXL's noise-prediction loss; FLUX trains with flow matching, so set both to 0"])
    if arch in ("sd15", "sdxl") and objective.timestep_sampling != "uniform":
        raise ConfigError([f"timestep_sampling={objective.timestep_sampling!r} is for FLUX's flow matching; "
                           f"{arch} draws its timesteps uniformly (try snr_gamma for SD1.5/SDXL), so leave it uniform"])
