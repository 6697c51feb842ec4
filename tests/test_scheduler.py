"""Flow-match Euler schedule and step against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

from imagegen import scheduler

CONFIGS = [
    {},
    {"shift": 3.0},
    {"use_dynamic_shifting": True, "time_shift_type": "exponential"},
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    {"shift": 2.0, "shift_terminal": 0.1},
]


def reference(config: dict, steps: int, custom, mu):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(
        num_inference_steps=None if custom is not None else steps,
        sigmas=None if custom is None else list(custom),
        mu=mu,
    )
    return ref


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 4, 9, 50])
@pytest.mark.parametrize("custom_sigmas", [False, True])
def test_sigmas_and_timesteps_match_diffusers(config, steps, custom_sigmas):
    custom = scheduler.default_sigmas(steps) if custom_sigmas else None
    mu = 1.15 if config.get("use_dynamic_shifting") else None
    ref = reference(config, steps, custom, mu)
    ours = scheduler.sigmas(scheduler.FlowMatchEulerConfig.from_dict(config), steps, custom, mu)
    np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scheduler.timesteps(ours), ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)


def test_euler_step_matches_diffusers():
    config = {"use_dynamic_shifting": True}
    ref = reference(config, 4, scheduler.default_sigmas(4), mu=0.8)
    sig = scheduler.sigmas(scheduler.FlowMatchEulerConfig.from_dict(config), 4, scheduler.default_sigmas(4), mu=0.8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 8)).astype(np.float32)
    ref_x, ours = torch.from_numpy(x), mx.array(x)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        ref_x = ref.step(torch.from_numpy(v), t, ref_x, return_dict=False)[0]
        ours = scheduler.euler_step(ours, mx.array(v), float(sig[i]), float(sig[i + 1]))
    np.testing.assert_allclose(np.array(ours), ref_x.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 4300, 4301, 16384])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flux2_empirical_mu(seq_len, steps):
    assert scheduler.empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), rel=1e-12)


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096])
def test_zimage_linear_mu(seq_len):
    assert scheduler.linear_mu(seq_len, 256, 4096, 0.5, 1.15) == pytest.approx(
        calculate_shift(seq_len, 256, 4096, 0.5, 1.15), rel=1e-12
    )


def test_dynamic_shift_requires_mu_and_unsupported_options_fail():
    with pytest.raises(ValueError, match="mu"):
        scheduler.sigmas(scheduler.FlowMatchEulerConfig(use_dynamic_shifting=True), 4)
    with pytest.raises(Exception, match="use_karras_sigmas"):
        scheduler.sigmas(scheduler.FlowMatchEulerConfig(use_karras_sigmas=True), 4)
