"""FlowSchedule (flow-matching time) against diffusers' FlowMatchEulerDiscreteScheduler and the flow ODE, and the
DDPM-time math of schedule.py / samplers.py running on it unchanged (docs/flow-matching.md)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tiny_flow import FLUX_DEV_SCHEDULER, SD35_SCHEDULER

from tlcm_core.flow_schedule import FlowSchedule, calculate_mu
from tlcm_core.samplers import student_clean_latents, tlcm_sample
from tlcm_core.schedule import ddim, milestones, sampler_timesteps

# diffusers computes its sigmas in float32 (a few ulp off the float64 values; measured <= 2e-7 absolute)
F32 = dict(rtol=1e-6, atol=0.0)
EXACT = dict(rtol=0.0, atol=0.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fixed_shift_sigmas_are_diffusers_training_sigmas(shift):
    """SD3-style fixed shift: index t is diffusers' sigmas[T-1-t]; the transformer timestep is sigma * 1000."""
    ref = FlowMatchEulerDiscreteScheduler(**{**SD35_SCHEDULER, "shift": shift})
    fs = FlowSchedule.from_config(dict(ref.config))
    assert fs.T == 1000 and fs.sigmas.dtype == torch.float64 and fs.prediction_type == "flow"
    torch.testing.assert_close(fs.sigmas.flip(0), ref.sigmas.double(), **F32)
    torch.testing.assert_close(fs.model_timestep(torch.arange(1000)).flip(0), ref.timesteps.double(), **F32)
    assert fs.sigmas[999] == 1.0 and bool((fs.sigmas.diff() > 0).all())  # pure noise at T-1, increasing in t
    assert torch.equal(FlowSchedule.from_config(dict(ref.config), image_seq_len=4096).sigmas, fs.sigmas)  # no mu


@pytest.mark.parametrize("kind", ["exponential", "linear"])
@pytest.mark.parametrize("seq_len", [64, 4096])
def test_dynamic_shift_sigmas_are_diffusers_shifted_sigmas(kind, seq_len):
    """FLUX-style resolution-dependent shift: mu from the image token count exactly as the pipelines compute it, and
    diffusers' training grid shifted by it (set_timesteps over all 1000 unshifted training sigmas)."""
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER, time_shift_type=kind)
    c = ref.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert calculate_mu(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift) == mu
    ref.set_timesteps(sigmas=ref.sigmas.numpy(), mu=mu)  # its initial sigmas are the unshifted training grid
    fs = FlowSchedule.from_config(dict(c), image_seq_len=seq_len)
    torch.testing.assert_close(fs.sigmas.flip(0), ref.sigmas[:-1].double(), **F32)
    assert fs.sigmas[999] == 1.0


def test_dynamic_shift_depends_on_resolution_and_bad_configs_are_refused():
    lo = FlowSchedule.from_config(FLUX_DEV_SCHEDULER, image_seq_len=256)
    hi = FlowSchedule.from_config(FLUX_DEV_SCHEDULER, image_seq_len=4096)
    assert bool((hi.sigmas[:-1] > lo.sigmas[:-1]).all())  # larger images: noisier at every index but T-1
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowSchedule.from_config(FLUX_DEV_SCHEDULER)
    for bad in ({"shift_terminal": 0.1}, {"invert_sigmas": True}, {"use_karras_sigmas": True},
                {"time_shift_type": "cosine"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FlowSchedule.from_config({**SD35_SCHEDULER, **bad})
    with pytest.raises(ValueError, match="max_shift"):
        FlowSchedule.from_config({**FLUX_DEV_SCHEDULER, "max_shift": None}, image_seq_len=64)
    with pytest.raises(ValueError, match="flow"):
        FlowSchedule(torch.linspace(0.001, 1, 1000, dtype=torch.float64), "epsilon")


def test_velocity_round_trip_and_forward_process():
    """x_t = (1 - sigma) x0 + sigma eps and v = eps - x0 give back (x0, eps), also at sigma = 1 where a_t = 0."""
    fs = FlowSchedule.from_config(SD35_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 4, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.tensor([999, 500, 124, 0])
    x_t = fs.add_noise(x0, eps, t)
    sigma = fs.sigmas[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps, **EXACT)
    assert torch.equal(x_t[0], eps[0])  # t = T-1 is pure noise
    a, s = fs.coeffs(t, x_t)
    assert torch.equal(a + s, torch.ones_like(a)) and a[0].item() == 0.0
    x0_hat, eps_hat = fs.to_x0_eps(eps - x0, x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)
    # scalar t and float32 inputs: coefficients in the input's dtype
    x0_f, _ = fs.to_x0_eps((eps - x0).float(), x_t.float(), 999)
    assert x0_f.dtype == torch.float32 and bool(torch.isfinite(x0_f).all())


def _euler_brute_force(fs: FlowSchedule, x_t, v, t: int, s: int):
    """The flow ODE dx/dsigma = v integrated index by index from t down to s (float64)."""
    x = x_t.clone()
    for k in range(t, s, -1):
        x = x + (fs.sigmas[k - 1] - fs.sigmas[k]) * v
    return x


@pytest.mark.parametrize("config,seq_len", [(SD35_SCHEDULER, None), (FLUX_DEV_SCHEDULER, 1024)])
def test_ddim_is_the_flow_euler_step_for_a_constant_velocity(config, seq_len):
    """schedule.ddim (written for DDPM time) on a FlowSchedule is x_s = x_t + (sigma_s - sigma_t) v: the flow ODE
    solved with the velocity held constant, which a fine index-by-index Euler integration reproduces."""
    fs = FlowSchedule.from_config(config, image_seq_len=seq_len)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    for t, s in [(999, 874), (999, 499), (749, 124), (124, 0), (10, 9)]:
        x0, _ = fs.to_x0_eps(v, x_t, t)
        torch.testing.assert_close(ddim(fs, x_t, x0, t, s), _euler_brute_force(fs, x_t, v, t, s), rtol=0, atol=1e-12)
    # per-sample targets, and s == t returns x_t exactly, as for NoiseSchedule
    xb, vb = x_t.repeat(3, 1, 1, 1), v.repeat(3, 1, 1, 1)
    t, s = torch.tensor([999, 600, 300]), torch.tensor([499, 600, 0])
    x0b, _ = fs.to_x0_eps(vb, xb, t)
    out = ddim(fs, xb, x0b, t, s)
    assert torch.equal(out[1], xb[1])
    for i in (0, 2):
        ref = _euler_brute_force(fs, xb[i:i + 1], vb[i:i + 1], int(t[i]), int(s[i]))
        torch.testing.assert_close(out[i:i + 1], ref, rtol=0, atol=1e-12)


def _velocity_model(fs: FlowSchedule):
    """A stand-in network: a fixed velocity field v(x, t) (smooth in x, depends on sigma_t), and its x0 function."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)) / 2

    def v_fn(x, t):
        sigma = fs.sigmas[torch.as_tensor(t).long()].float().reshape(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", w, torch.tanh(x)) * (1 + sigma) - 0.3

    return v_fn, (lambda x, t: fs.to_x0_eps(v_fn(x, t), x, t)[0])


@pytest.mark.parametrize("steps", [2, 4])
def test_tlcm_sample_runs_unchanged_in_flow_time(steps):
    """samplers.tlcm_sample on a FlowSchedule is the flow-time TLCM sampler written out: x0 = x - sigma v, then
    re-noise (1 - sigma') x0 + sigma' eps with fresh noise from the same generator, or the Euler jump
    x + (sigma' - sigma) v; the last x0 is returned. The milestones and step subsets are index math, unchanged."""
    fs = FlowSchedule.from_config(FLUX_DEV_SCHEDULER, image_seq_len=64)
    v_fn, x0_fn = _velocity_model(fs)
    ts = sampler_timesteps(steps, milestones(fs.T, 8))
    assert ts == {2: [999, 499], 4: [999, 749, 499, 124]}[steps]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for mode in ("renoise", "multistep"):
        out = tlcm_sample(x0_fn, x_T, ts, fs, mode=mode, generator=torch.Generator().manual_seed(4))
        g, x = torch.Generator().manual_seed(4), x_T
        for i, t in enumerate(ts):
            sig, v = fs.sigmas[t].item(), v_fn(x, torch.full((2,), t))
            x0 = x - sig * v
            if i + 1 < len(ts):
                nxt = fs.sigmas[ts[i + 1]].item()
                x = ((1 - nxt) * x0 + nxt * torch.randn(x.shape, generator=g)) if mode == "renoise" else \
                    x + (nxt - sig) * v
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_student_clean_latents_runs_unchanged_in_flow_time():
    """Algorithm 2's q-step sampler (999, 749, 499, 249 for q = 4) re-noises with the starting noise (`same`) or
    fresh noise, at the flow sigmas."""
    fs = FlowSchedule.from_config(SD35_SCHEDULER)
    v_fn, x0_fn = _velocity_model(fs)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for renoise in ("same", "fresh"):
        out = student_clean_latents(x0_fn, x_T, 4, fs, renoise=renoise, generator=torch.Generator().manual_seed(6))
        g, x = torch.Generator().manual_seed(6), x_T
        for i, t in enumerate([999, 749, 499, 249]):
            x0 = x - fs.sigmas[t].item() * v_fn(x, torch.full((2,), t))
            if i < 3:
                eps = x_T if renoise == "same" else torch.randn(x.shape, generator=g)
                nxt = fs.sigmas[[749, 499, 249][i]].item()
                x = (1 - nxt) * x0 + nxt * eps
        torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_sigmas_at_the_milestones():
    """Where the M = 8 milestones sit on the shifted sigma axis (docs/flow-matching.md prints this table)."""
    ms = milestones(1000, 8)
    sd3 = FlowSchedule.from_config(SD35_SCHEDULER).sigmas[ms]
    u = (torch.tensor(ms, dtype=torch.float64) + 1) / 1000
    torch.testing.assert_close(sd3, 3 * u / (1 + 2 * u), **EXACT)
    flux_1024px = FlowSchedule.from_config(FLUX_DEV_SCHEDULER, image_seq_len=4096).sigmas[ms]
    np.testing.assert_allclose(flux_1024px.numpy(), np.e**1.15 / (np.e**1.15 + 1 / u.numpy() - 1), rtol=1e-14)
