"""Deterministic samplers: PLMS, DDIM and DPM-Solver++(2M), each matching its
diffusers scheduler (PNDMScheduler, with or without its Runge-Kutta warm-up;
DDIMScheduler with eta 0, with or without clip_sample; DPMSolverMultistepScheduler)
under SD v1's scheduler config.

Each sampler splits into a host part and a device part. `plan(schedule, num_steps)`
runs the scheduler's bookkeeping on the host (timesteps, which history to combine,
every coefficient) and returns per-step arrays; `init / current / update` form a
branch-free step, so the whole loop is one `lax.scan` over the plan (see `run`).
Timesteps are spaced by the schedule's `timestep_spacing` ("leading" + steps_offset,
"linspace" or "trailing", as each scheduler computes it), by default as each
scheduler's default: "leading" for PLMS and DDIM, "linspace" for DPM-Solver++.
Every sampler takes the model's raw (guided) output, noise or v, and reads it as its
diffusers scheduler does: DDIM its x0 and noise estimates straight from v, PLMS the
combination of raw outputs, converted as PNDMScheduler does, and DPM-Solver++ its data
estimate at the step's own sigma (alpha x - sigma v), as DPMSolverMultistepScheduler
does (a Karras step's sigma lies between those of the timesteps the model is called
at). Going through a noise estimate first, (x - sqrt(1 - abar) eps) / sqrt(abar) loses
float32 precision where abar is tiny.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from seed_jax.diffusion.schedule import NoiseSchedule

Plan = dict[str, np.ndarray]  # per-step arrays, leading axis = number of model evaluations


def _check_steps(schedule: NoiseSchedule, num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or not 1 <= num_steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_steps: expected an int in 1..{schedule.num_train_timesteps}, got {num_steps!r}")


def _spaced(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """PNDMScheduler's and DDIMScheduler's ascending int timesteps: "leading" k * (T // n)
    + steps_offset (the default), "linspace" n points rounded over [0, T - 1], "trailing"
    T - 1 down by T / n. All must lie in [0, T) (with steps_offset 1, n = T "leading"
    steps would reach timestep T, past the schedule), n of them."""
    n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing or "leading"
    if spacing == "leading":
        timesteps = np.arange(num_steps) * (n // num_steps) + schedule.steps_offset
    elif spacing == "linspace":
        timesteps = np.linspace(0, n - 1, num_steps).round().astype(np.int64)
    else:
        timesteps = np.round(np.arange(n, 0, -n / num_steps))[::-1].astype(np.int64) - 1
    return _check_spaced(schedule, num_steps, timesteps, spacing)


def _check_spaced(schedule: NoiseSchedule, num_steps: int, timesteps: np.ndarray, spacing: str) -> np.ndarray:
    n = schedule.num_train_timesteps
    if len(timesteps) != num_steps or timesteps.min() < 0 or timesteps.max() >= n:
        raise ValueError(f"num_steps: {num_steps} steps spaced {spacing!r} (steps_offset {schedule.steps_offset}) "
                         f"give timesteps {timesteps.min()}..{timesteps.max()} ({len(timesteps)} of them), outside "
                         f"the schedule's 0..{n - 1}; use fewer steps")
    return timesteps


class DDIM:
    """x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t) (a v-predicting model's: sqrt(a_t) x -
    sqrt(1-a_t) v, its eps sqrt(a_t) v + sqrt(1-a_t) x), clipped to [-c, c] with
    clip_sample; x <- sqrt(a_prev) x0 + sqrt(1-a_prev) eps."""

    @staticmethod
    def plan(schedule: NoiseSchedule, num_steps: int) -> Plan:
        _check_steps(schedule, num_steps)
        abar = schedule.alphas_cumprod().astype(np.float64)
        timesteps = _spaced(schedule, num_steps)[::-1]
        prev = timesteps - schedule.num_train_timesteps // num_steps
        a_t = abar[timesteps]
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], schedule.final_alpha_cumprod())
        no_clip = np.finfo(np.float32).max  # a finite plan: every value passes
        clip = np.full(num_steps, schedule.clip_sample_range if schedule.clip_sample else no_clip)
        return {"timestep": timesteps, "a_t": a_t, "a_prev": a_prev, "clip": clip,
                "v_prediction": np.full(num_steps, schedule.prediction_type == "v_prediction")}

    @staticmethod
    def init(x):
        return x

    @staticmethod
    def current(carry):
        return carry

    @staticmethod
    def update(x, output, step):
        signal, noise = jnp.sqrt(step["a_t"]), jnp.sqrt(1 - step["a_t"])
        v = step["v_prediction"]
        eps = jnp.where(v, signal * output + noise * x, output)
        x0 = jnp.where(v, signal * x - noise * output, (x - noise * output) / signal)
        x0 = jnp.clip(x0, -step["clip"], step["clip"])
        return jnp.sqrt(step["a_prev"]) * x0 + jnp.sqrt(1 - step["a_prev"]) * eps


class PLMS:
    """Pseudo linear multistep (PNDM): n + 1 model evaluations with skip_prk_steps.
    The second evaluation redoes the first step from the saved start with the mean of
    both estimates; later steps combine the newest estimate with up to three earlier
    ones (Adams-Bashforth weights). Without skip_prk_steps, PNDMScheduler's
    Runge-Kutta steps come first (four evaluations each, weighted 1/6, 1/3, 1/3, 1/6,
    all from the step's start; the first of each is kept), then 4-term multistep ones.
    Estimates are the model's raw outputs: a v-prediction combination becomes a noise
    estimate at the step's start (`v_output` * combined + `v_start` * start)."""

    HISTORY = 3
    WEIGHTS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    RUNGE_KUTTA = {0: (1 / 6, 1.0, 0.0), 1: (1 / 3, 1.0, 0.0), 2: (1 / 3, 1.0, 0.0), 3: (0.0, 1 / 6, 1.0)}
    """Stage -> (weight added to the running sum, weight of this estimate, of the sum)."""

    @classmethod
    def plan(cls, schedule: NoiseSchedule, num_steps: int) -> Plan:
        _check_steps(schedule, num_steps)
        abar = schedule.alphas_cumprod().astype(np.float64)
        alpha = lambda t: abar[t] if t >= 0 else schedule.final_alpha_cumprod()  # noqa: E731
        ratio = schedule.num_train_timesteps // num_steps
        base = _spaced(schedule, num_steps)
        if not schedule.skip_prk_steps and num_steps < 4:  # diffusers would stop short of timestep 0
            raise ValueError(f"num_steps: expected >= 4 for plms with PNDM's Runge-Kutta warm-up (the scheduler "
                             f"config's skip_prk_steps=False), got {num_steps}")
        rows = []
        if schedule.skip_prk_steps:
            multistep, num_pushed = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1], 0
        else:
            rows += cls._runge_kutta_rows(base, ratio)
            multistep, num_pushed = base[:-3][::-1], sum(r["push"] for r in rows)
        for counter, t in enumerate(int(t) for t in multistep):
            if counter == 1 and schedule.skip_prk_steps:  # averaged with the first estimate; not kept
                rows.append(cls._row(t, t + ratio, t, [0.5, 0.5], push=False, from_saved=True))
            else:
                num_pushed = min(num_pushed + 1, 4)
                rows.append(cls._row(t, t, t - ratio, cls.WEIGHTS[num_pushed], push=True,
                                     save=counter == 0 and schedule.skip_prk_steps))
        plan = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
        a_from = np.asarray([alpha(t) for t in plan.pop("t_from")])
        a_to = np.asarray([alpha(t) for t in plan.pop("t_to")])
        v = schedule.prediction_type == "v_prediction"
        plan.update(a_from=a_from, a_to=a_to, v_output=np.sqrt(a_from) if v else np.ones_like(a_from),
                    v_start=np.sqrt(1 - a_from) if v else np.zeros_like(a_from))
        return plan

    @classmethod
    def _row(cls, t: int, t_from: int, t_to: int, weights, *, push: bool, from_saved: bool = False,
             save: bool = False, running=(0.0, 0.0)) -> dict:
        """One evaluation at t, stepping from t_from to t_to; `running`: (weight of this
        estimate added to the Runge-Kutta sum, weight of the sum in the combination)."""
        return {"timestep": t, "t_from": t_from, "t_to": t_to, "push": push, "from_saved": from_saved,
                "save": save, "weights": np.pad(weights, (0, 1 + cls.HISTORY - len(weights))),
                "running_add": running[0], "running_weight": running[1]}

    @classmethod
    def _runge_kutta_rows(cls, base: np.ndarray, ratio: int) -> list[dict]:
        """PNDMScheduler's prk_timesteps over the last four `base` timesteps and its step_prk."""
        last = base[-4:]
        timesteps = (np.repeat(last, 2) + np.tile([0, ratio // 2], len(last)))[:-1].repeat(2)[1:-1][::-1]
        rows = []
        for counter, t in enumerate(int(t) for t in timesteps):
            stage = counter % 4
            running_add, own, running_weight = cls.RUNGE_KUTTA[stage]
            t_to = t - (0 if counter % 2 else ratio // 2)
            rows.append(cls._row(t, int(timesteps[counter - stage]), t_to, [own], push=stage == 0,
                                 from_saved=stage > 0, save=stage == 0, running=(running_add, running_weight)))
        return rows

    @classmethod
    def init(cls, x):
        return {"x": x, "saved": x, "running": jnp.zeros_like(x),
                "history": jnp.zeros((cls.HISTORY,) + x.shape, x.dtype)}

    @staticmethod
    def current(carry):
        return carry["x"]

    @staticmethod
    def update(carry, output, step):
        """weights over [output, newest kept output, ..., oldest], plus the Runge-Kutta sum."""
        x, history = carry["x"], carry["history"]
        w = step["weights"]
        combined = w[0] * output + jnp.tensordot(w[1:], history, axes=1) + step["running_weight"] * carry["running"]
        start = jnp.where(step["from_saved"], carry["saved"], x)
        eps = step["v_output"] * combined + step["v_start"] * start
        a_t, a_prev = step["a_from"], step["a_to"]
        denominator = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
        new_x = jnp.sqrt(a_prev / a_t) * start - (a_prev - a_t) * eps / denominator
        pushed = jnp.concatenate([output[None], history[:-1]])
        running = jnp.where(step["running_weight"] > 0, 0.0, carry["running"]) + step["running_add"] * output
        return {"x": new_x, "saved": jnp.where(step["save"], x, carry["saved"]), "running": running,
                "history": jnp.where(step["push"], pushed, history)}


class DPMSolverPP:
    """DPM-Solver++(2M) in data prediction: first order on the first and the final
    step (the final sigma is 0), second order (midpoint) in between; on Karras sigmas
    when the schedule says `use_karras_sigmas`. The data estimate comes from the
    model's output at the step's (alpha, sigma): (x - sigma eps) / alpha, or
    alpha x - sigma v for a v-predicting model."""

    @staticmethod
    def plan(schedule: NoiseSchedule, num_steps: int) -> Plan:
        _check_steps(schedule, num_steps)
        if schedule.dpm_unfollowed:
            raise ValueError(f"sampler: dpm++2m does not follow this model's scheduler_config.json "
                             f"{schedule.dpm_unfollowed} (DPM-Solver++(2M), midpoint, final sigma 0); use plms or ddim")
        timesteps, sigmas = DPMSolverPP.timesteps_and_sigmas(schedule, num_steps)
        sigmas = np.concatenate([sigmas, [0.0]])
        alphas = 1.0 / np.sqrt(sigmas ** 2 + 1)
        sigmas_t = sigmas * alphas
        with np.errstate(divide="ignore"):
            lambdas = np.log(alphas) - np.log(sigmas_t)  # +inf at the final sigma 0
        rows = {k: [] for k in ("timestep", "alpha_s", "sigma_s", "x_coef", "m0_coef", "m1_coef")}
        for i, t in enumerate(timesteps):
            h = lambdas[i + 1] - lambdas[i]
            decay = np.exp(-h) - 1.0  # -1 at the final step
            first_order = i == 0 or i == num_steps - 1
            r = None if first_order else (lambdas[i] - lambdas[i - 1]) / h
            rows["timestep"].append(t)
            rows["alpha_s"].append(alphas[i])
            rows["sigma_s"].append(sigmas_t[i])
            rows["x_coef"].append(sigmas_t[i + 1] / sigmas_t[i])
            rows["m0_coef"].append(-alphas[i + 1] * decay * (1.0 if first_order else 1.0 + 0.5 / r))
            rows["m1_coef"].append(0.0 if first_order else 0.5 * alphas[i + 1] * decay / r)
        rows["v_prediction"] = [schedule.prediction_type == "v_prediction"] * num_steps
        return {k: np.asarray(v) for k, v in rows.items()}

    @staticmethod
    def timesteps_and_sigmas(schedule: NoiseSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """DPMSolverMultistepScheduler's descending int timesteps (n,) and their sigmas
        sqrt((1 - abar) / abar) (n,): the timesteps spaced (`timesteps`) and their sigmas
        interpolated, or with `use_karras_sigmas` Karras et al.'s sigmas (rho 7) from the
        schedule's largest to its smallest and the timesteps where they fall, interpolated
        in log sigma and rounded (as diffusers, for any num_steps up to T)."""
        abar = schedule.alphas_cumprod().astype(np.float64)
        all_sigmas = ((1 - abar) / abar) ** 0.5  # ascending in t
        n = schedule.num_train_timesteps
        if not schedule.use_karras_sigmas:
            timesteps = DPMSolverPP.timesteps(schedule, num_steps)
            return timesteps, np.interp(timesteps, np.arange(n), all_sigmas)
        if schedule.beta_schedule == "squaredcos_cap_v2":  # diffusers keeps them fractional
            raise ValueError("sampler: dpm++2m's Karras timesteps (use_karras_sigmas) lie between integers under "
                             "the cosine beta_schedule, which the samplers do not take; use plms or ddim")
        rho, ramp = 7.0, np.linspace(0, 1, num_steps)
        sigma_max, sigma_min = all_sigmas[-1] ** (1 / rho), all_sigmas[0] ** (1 / rho)
        sigmas = (sigma_max + ramp * (sigma_min - sigma_max)) ** rho
        # the step sizes come from the sigmas: near sigma_min, rounding may repeat a timestep
        timesteps = np.interp(np.log(sigmas), np.log(all_sigmas), np.arange(n)).round().astype(np.int64)
        return timesteps, sigmas

    @staticmethod
    def timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
        """DPMSolverMultistepScheduler's descending timesteps: "linspace" (the default) and
        "leading" take n of n + 1 points, "trailing" T - 1 down by T / n."""
        n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing or "linspace"
        if spacing == "linspace":
            timesteps = np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(num_steps + 1) * (n // (num_steps + 1)))[::-1][:-1] + schedule.steps_offset
        else:
            timesteps = np.arange(n, 0, -n / num_steps).round().astype(np.int64) - 1
        _check_spaced(schedule, num_steps, timesteps, spacing)
        if (np.diff(timesteps) >= 0).any():  # a repeated timestep: a zero step size, NaN coefficients
            raise ValueError(f"num_steps: {num_steps} dpm++2m steps spaced {spacing!r} over {n} timesteps repeat "
                             "a timestep; use fewer steps")
        return timesteps

    @staticmethod
    def init(x):
        return {"x": x, "previous": jnp.zeros_like(x)}

    @staticmethod
    def current(carry):
        return carry["x"]

    @staticmethod
    def update(carry, output, step):
        x = carry["x"]
        data = jnp.where(step["v_prediction"], step["alpha_s"] * x - step["sigma_s"] * output,
                         (x - step["sigma_s"] * output) / step["alpha_s"])
        new_x = step["x_coef"] * x + step["m0_coef"] * data + step["m1_coef"] * carry["previous"]
        return {"x": new_x, "previous": data}


SAMPLERS = {"plms": PLMS, "ddim": DDIM, "dpm++2m": DPMSolverPP}


def get(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def run(sampler, plan: Plan, denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Runs the whole loop as one lax.scan (call under jit). `denoise(x, timestep)`
    gives the model's output (noise or v, as the schedule's prediction_type) for x
    (B,...) at a scalar timestep; x starts as the initial noise. The plan's arrays are
    cast to float32."""
    steps = {k: jnp.asarray(v, jnp.int32 if k == "timestep" else
                            (jnp.bool_ if v.dtype == bool else jnp.float32)) for k, v in plan.items()}

    def body(carry, step):
        output = denoise(sampler.current(carry), step["timestep"]).astype(x.dtype)
        return sampler.update(carry, output, step), None

    return sampler.current(jax.lax.scan(body, sampler.init(x), steps)[0])
