"""The DDPM noise schedule (SD v1: scaled-linear betas 0.00085 -> 0.012 over 1000 steps;
linear and cosine betas as diffusers' schedulers also offer)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
# The schedules whose betas run from beta_start to beta_end (the cosine one ignores both).
RANGED_BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = (None, "leading", "linspace", "trailing")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1  # added to "leading" inference timesteps (SD v1's scheduler config)
    set_alpha_to_one: bool = False  # alpha-bar after the last step: 1, or that of timestep 0
    # What the model predicts: the noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0
    # (better behaved at high noise; each sampler reads it as its diffusers scheduler does).
    prediction_type: str = "epsilon"
    # DDIM clips its x0 estimate to [-clip_sample_range, clip_sample_range] (DDIMScheduler's clip_sample)
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # PLMS's first steps: PNDM's Runge-Kutta ones unless skipped (PNDMScheduler's skip_prk_steps)
    skip_prk_steps: bool = True
    # How inference timesteps spread over the schedule, as the diffusers schedulers read it; None:
    # each sampler's scheduler's default ("leading" for PLMS and DDIM, "linspace" for DPM-Solver++)
    timestep_spacing: str | None = None
    # DPM-Solver++'s sigmas: Karras et al.'s (rho 7) between the schedule's extremes, the
    # timesteps rounded from them (DPMSolverMultistepScheduler's use_karras_sigmas; PLMS and
    # DDIM ignore it, as PNDMScheduler and DDIMScheduler do)
    use_karras_sigmas: bool = False
    # The file's DPMSolverMultistepScheduler settings that dpm++2m does not follow ("key=value,
    # ..."): dpm++2m refuses to sample with them; PLMS and DDIM, whose schedulers ignore them, sample
    dpm_unfollowed: str = ""

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected an integer >= 1, got {self.num_train_timesteps!r}")
        # a negative offset would index alpha-bar from its end
        if not isinstance(self.steps_offset, int) or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset: expected an integer in [0, num_train_timesteps = "
                             f"{self.num_train_timesteps}), got {self.steps_offset!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.beta_schedule in RANGED_BETA_SCHEDULES:
            self._check_beta_range()
        self._check_alpha_bar_stays_normal()

    def _check_beta_range(self):
        """Each step's noise variance beta must lie in (0, 1); the betas run from beta_start to beta_end."""
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}: expected 0 < {name} < 1 (a noise variance) for beta_schedule "
                                 f"{self.beta_schedule!r}, got {value!r}")

    def _check_alpha_bar_stays_normal(self):
        """The samplers divide by alpha-bar (and its square root): it may not underflow float32."""
        abar = self.alphas_cumprod()
        tiny = np.finfo(np.float32).tiny
        if abar[-1] < tiny:
            first = int(np.argmax(abar < tiny))
            raise ValueError(f"beta_start/beta_end: alpha-bar, the product of (1 - beta), falls below float32's "
                             f"smallest normal number {tiny} at timestep {first} of num_train_timesteps = "
                             f"{self.num_train_timesteps}; expected smaller betas or fewer timesteps")

    def alphas_cumprod(self) -> np.ndarray:
        """(T,) alpha-bar, computed in float32 as the reference schedulers do."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32) ** 2
        elif self.beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(n)
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        return np.cumprod(np.float32(1.0) - betas, dtype=np.float32)

    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod()[0])


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """(n,) float32 betas of the cosine schedule (Nichol & Dhariwal; diffusers'
    "squaredcos_cap_v2"): 1 - abar((i+1)/n) / abar(i/n), abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2,
    capped at `max_beta`."""
    abar = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - abar[1:] / abar[:-1], max_beta).astype(np.float32)


def _abar(schedule: NoiseSchedule, timesteps: jax.Array, ndim: int) -> jax.Array:
    """alpha-bar at int `timesteps` (B,) or (), shaped to broadcast over (B, ...) of rank `ndim`."""
    abar = jnp.asarray(schedule.alphas_cumprod())[timesteps]
    return abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0/noise (B,...), timesteps (B,) int."""
    abar = _abar(schedule, timesteps, x0.ndim)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """What the model learns to output for x_t = add_noise(x0, noise, t): the noise, or v."""
    if schedule.prediction_type == "epsilon":
        return noise
    abar = _abar(schedule, timesteps, x0.ndim)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
