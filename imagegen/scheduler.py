"""Flow-match Euler: the sigma schedule and the step. Follows diffusers' FlowMatchEulerDiscreteScheduler.

Stateless math: ``sigmas()`` builds the schedule (computed in float32 numpy, as diffusers does, so
the schedules agree bit for bit); ``euler_step`` moves latents from one sigma to the next.
Family-specific shift rules (FLUX.2's empirical mu, Z-Image's linear mu) pass ``mu`` in.
"""

from __future__ import annotations

import math
from typing import Literal

import mlx.core as mx
import numpy as np

from .config import HFConfig
from .errors import WeightsError


class FlowMatchEulerConfig(HFConfig):
    """scheduler/scheduler_config.json; defaults are diffusers' FlowMatchEulerDiscreteScheduler's."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    stochastic_sampling: bool = False


def default_sigmas(steps: int) -> np.ndarray:
    """1 -> 1/steps, evenly spaced: what FLUX.2 and Z-Image pipelines pass as custom sigmas."""
    return np.linspace(1.0, 1.0 / steps, steps)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Resolution-dependent shift (sigma exponent 1, as diffusers calls it)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


def fixed_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigmas(
    config: FlowMatchEulerConfig, steps: int, custom: np.ndarray | list[float] | None = None, mu: float | None = None
) -> np.ndarray:
    """The schedule of ``steps`` sigmas plus the terminal 0, float32. Timesteps are sigmas * 1000."""
    unsupported = [
        k
        for k in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "stochastic_sampling",
            "invert_sigmas",
        )
        if getattr(config, k)
    ]
    if unsupported:
        raise WeightsError(f"Scheduler option(s) not supported: {', '.join(unsupported)}")
    if custom is None:
        # diffusers: linspace between the shifted training extremes
        train = np.linspace(1, config.num_train_timesteps, config.num_train_timesteps, dtype=np.float32)[::-1]
        train = train / config.num_train_timesteps
        if not config.use_dynamic_shifting:
            train = fixed_shift(config.shift, train)
        n = config.num_train_timesteps
        t = np.linspace(float(train[0]) * n, float(train[-1]) * n, steps)
        s = t / config.num_train_timesteps
    else:
        s = np.asarray(custom).astype(np.float32)
    if config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this scheduler config uses dynamic shifting: pass mu")
        s = time_shift(mu, s, config.time_shift_type)
    else:
        s = fixed_shift(config.shift, s)
    if config.shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    return np.append(np.asarray(s, dtype=np.float32), np.float32(0.0))


def timesteps(sigma_schedule: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """The model's timestep input per step (drops the terminal sigma)."""
    return (sigma_schedule[:-1] * num_train_timesteps).astype(np.float32)


def euler_step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x_{next} = x + (sigma_next - sigma) * v, in float32, cast back to the velocity's dtype."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    out = latents.astype(mx.float32) + dt * velocity.astype(mx.float32)
    return out.astype(velocity.dtype)


def linear_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The FLUX.1-style mu, linear in the image token count (Z-Image's calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's mu (diffusers compute_empirical_mu): fitted lines at 10 and 200 steps, interpolated."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + (m_200 - 200.0 * a))
