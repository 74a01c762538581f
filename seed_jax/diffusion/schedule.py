"""The DDPM noise schedule (SD v1: scaled-linear betas 0.00085 -> 0.012 over 1000 steps)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1  # added to "leading" inference timesteps (SD v1's scheduler config)
    set_alpha_to_one: bool = False  # alpha-bar after the last step: 1, or that of timestep 0

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")

    def alphas_cumprod(self) -> np.ndarray:
        """(T,) alpha-bar, computed in float32 as the reference schedulers do."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        return np.cumprod(np.float32(1.0) - betas, dtype=np.float32)

    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod()[0])


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0/noise (B,...), timesteps (B,) int."""
    abar = jnp.asarray(schedule.alphas_cumprod())[timesteps].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
