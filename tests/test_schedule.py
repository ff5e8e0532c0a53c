"""The math against references: diffusers' DDIM, hand-made inputs, the paper's milestones."""

import pytest
import torch
from diffusers import DDIMScheduler

from tlcm_core.losses import consistency_loss, make_distance, mse, pseudo_huber
from tlcm_core.schedule import (NoiseSchedule, cfg, ddim, ddim_step, ddim_timesteps, lower_boundary, mds_plan,
                                milestones, sample_mlcd_timesteps, sampler_timesteps, segment_index)

SDXL_SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def _ddim_scheduler(pred="epsilon"):
    return DDIMScheduler(**{**SDXL_SCHED, "prediction_type": pred}, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=0, timestep_spacing="trailing")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(pred):
    sched = _ddim_scheduler(pred)
    sched.set_timesteps(10)
    ours = NoiseSchedule.from_config({**SDXL_SCHED, "prediction_type": pred})
    torch.testing.assert_close(ours.alphas_cumprod.float(), sched.alphas_cumprod.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    for t in sched.timesteps[:-1].tolist():
        prev = t - 1000 // 10
        ref = sched.step(out, t, x).prev_sample
        mine = ddim_step(ours, x.double(), out.double(), t, prev).float()
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_ddim_from_x0_is_identity_at_same_t_and_per_sample():
    s = NoiseSchedule.from_config(SDXL_SCHED)
    x, x0 = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([500, 300, 124, 10])
    assert torch.equal(ddim(s, x, x0, t, t), x)
    tgt = torch.tensor([499, 249, 124, 0])
    out = ddim(s, x, x0, t, tgt)
    assert torch.equal(out[2], x[2])  # t == t_step -> exactly the input
    for i in (0, 1, 3):
        a_t, s_t = s.coeffs(int(t[i]), x[i:i + 1])
        a_s, s_s = s.coeffs(int(tgt[i]), x[i:i + 1])
        ref = a_s * x0[i:i + 1] + s_s * (x[i:i + 1] - a_t * x0[i:i + 1]) / s_t
        torch.testing.assert_close(out[i:i + 1], ref)


def test_v_prediction_round_trip():
    s = NoiseSchedule.from_config({**SDXL_SCHED, "prediction_type": "v_prediction"})
    x0, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([700, 50])
    a, sg = s.coeffs(t, x0)
    x_t, v = a * x0 + sg * eps, a * eps - sg * x0
    x0_hat, eps_hat = s.to_x0_eps(v, x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_cfg():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(cfg(u, c, 8.0), torch.tensor([17.0, -14.0]))
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    torch.testing.assert_close(cfg(u, c, 0.0), u)


def test_milestones_are_the_official_ones():
    assert milestones(1000, 8) == [999, 874, 749, 624, 499, 374, 249, 124, 0]
    assert milestones(1000, 4) == [999, 749, 499, 249, 0]
    assert milestones(1000, 1) == [999, 0]


def test_segments_and_lower_boundary():
    b = milestones(1000, 8)
    t = torch.tensor([1, 124, 125, 500, 874, 875, 999, 0])
    assert segment_index(t, b).tolist() == [0, 0, 1, 4, 6, 7, 7, 0]
    assert lower_boundary(t, b).tolist() == [0, 0, 124, 499, 749, 874, 874, 0]


def test_mds_plan_more_steps_for_smaller_t():
    b = milestones(1000, 8)
    # segment s takes M - s steps from 999 down to t_m (Algorithm 1)
    assert mds_plan(900, b) == [999, 900]  # top segment: 1 step
    p = mds_plan(50, b)  # segment 0: 8 steps
    assert len(p) == 9 and p[0] == 999 and p[-1] == 50
    assert all(x > y for x, y in zip(p, p[1:]))
    assert len(mds_plan(600, b)) - 1 == 8 - 4
    assert mds_plan(999, b) == [999]
    with pytest.raises(ValueError):
        mds_plan(1000, b)
    lengths = [len(mds_plan(t, b)) - 1 for t in range(1, 999, 7)]
    assert lengths == sorted(lengths, reverse=True)


def test_training_timesteps_respect_segments():
    b = milestones(1000, 8)
    t_hi, t_lo, t_step = sample_mlcd_timesteps(5000, b, 20, torch.Generator().manual_seed(0))
    assert (t_hi >= 1).all() and (t_hi <= 999).all()
    assert (t_lo < t_hi).all() and (t_hi - t_lo <= 20).all()
    assert (t_lo >= t_step).all()
    assert torch.equal(lower_boundary(t_hi, b), t_step)
    assert (t_lo == t_step).any() and (t_hi - t_lo == 20).any()  # both the clamp and the plain skip occur


def test_sampler_timesteps():
    b = milestones(1000, 8)
    assert sampler_timesteps(2, b) == [999, 499]
    assert sampler_timesteps(3, b) == [999, 499, 124]
    assert sampler_timesteps(4, b) == [999, 749, 499, 124]
    assert sampler_timesteps(8, b) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert sampler_timesteps(1, b) == [999]
    # the official release's subsets for 5, 6 and 7 steps (not evenly spaced)
    assert sampler_timesteps(5, b) == [999, 749, 499, 249, 124]
    assert sampler_timesteps(6, b) == [999, 749, 499, 374, 249, 124]
    assert sampler_timesteps(7, b) == [999, 749, 624, 499, 374, 249, 124]
    five = sampler_timesteps(5, milestones(1000, 10))  # other grids: an evenly spaced subset of the milestones
    assert len(five) == 5 and five[0] == 999 and all(t in milestones(1000, 10) for t in five)
    with pytest.raises(ValueError, match="schedule has 8"):
        sampler_timesteps(12, b)
    assert sampler_timesteps(2, milestones(1000, 4)) == [999, 499]


def test_ddim_timesteps_trailing_matches_diffusers():
    sched = _ddim_scheduler()
    for n in (1, 2, 4, 25):
        sched.set_timesteps(n)
        assert ddim_timesteps(n) == sched.timesteps.tolist()


def test_losses_on_hand_made_inputs():
    p, t = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t[1] *= 3
    assert mse(p, t).tolist() == [1.0, 9.0]
    h = pseudo_huber(0.5)(p, t)
    torch.testing.assert_close(h, torch.tensor([(1 + 0.25) ** 0.5 - 0.5, (9 + 0.25) ** 0.5 - 0.5]))
    pred = torch.zeros(2, 1, 2, 2, requires_grad=True)
    target = torch.ones(2, 1, 2, 2, requires_grad=True)
    loss = consistency_loss(pred, target, make_distance("mse"))
    loss.backward()
    assert loss.item() == 1.0 and target.grad is None and pred.grad is not None  # stop-gradient on the target
    with pytest.raises(ValueError, match="latent LPIPS"):
        make_distance("latent-lpips")


def test_the_exported_scheduler_visits_the_same_timesteps_as_our_sampler():
    """scheduler.py ships on its own inside every export (scheduling_tlcm.py), so it keeps its own copy of the
    official step subsets: they must agree with the sampler the evaluation uses, for every step count."""
    from tlcm_core.scheduler import tlcm_milestones, tlcm_sampler_timesteps

    for segments in (4, 8, 10):
        b = milestones(1000, segments)
        assert tlcm_milestones(1000, segments) == b
        for n in range(1, segments + 1):
            assert tlcm_sampler_timesteps(n, b) == sampler_timesteps(n, b), (segments, n)


def test_level_spaced_is_the_exact_best_subset():
    """The DP against brute force over every subset that starts at the noisiest milestone."""
    import itertools

    from tlcm_core.schedule import level_spaced

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        M = int(torch.randint(2, 10, (1,), generator=g))
        levels = sorted(torch.rand(M, generator=g, dtype=torch.float64).tolist(), reverse=True)
        upper = list(range(100 * M, 0, -100))
        for n in range(1, M + 1):
            targets = [1 - k / n for k in range(n)]
            best = min(sum(abs(levels[i] - t) for i, t in zip((0, *rest), targets))
                       for rest in itertools.combinations(range(1, M), n - 1))
            got = level_spaced(upper, levels, n)
            assert len(got) == n and got[0] == upper[0] and got == sorted(got, reverse=True), (trial, n)
            cost = sum(abs(levels[upper.index(t)] - tt) for t, tt in zip(got, targets))
            assert cost == pytest.approx(best, abs=1e-12), (trial, n, got)


def test_sigma_grid_places_the_steps_at_evenly_spaced_noise_levels():
    from tlcm_core.flow_schedule import FlowSchedule

    b = milestones(1000, 8)
    sd3 = FlowSchedule.from_config({"shift": 3.0})  # SD3 / the toy flow teacher: sigma 0.75 at index 499
    assert sampler_timesteps(2, b, "sigma", sd3) == [999, 249]  # sigma 1, 0.5
    assert sampler_timesteps(3, b, "sigma", sd3) == [999, 374, 124]
    assert sampler_timesteps(4, b, "sigma", sd3) == [999, 499, 249, 124]  # sigma 1, 0.75, 0.5, 0.3
    assert sampler_timesteps(8, b, "sigma", sd3) == sampler_timesteps(8, b)
    unshifted = FlowSchedule.from_config({"shift": 1.0})  # levels (t+1)/T: the sigma grid is the index grid
    assert sampler_timesteps(2, b, "sigma", unshifted) == [999, 499]
    sdxl = NoiseSchedule.from_config({})  # levels s/(a+s) of the equivalent flow
    assert sampler_timesteps(2, b, "sigma", sdxl) == [999, 374]
    for n in range(1, 9):  # the official grid is untouched by the option
        assert sampler_timesteps(n, b, "official", sd3) == sampler_timesteps(n, b)
    with pytest.raises(ValueError, match="schedule"):
        sampler_timesteps(2, b, "sigma")
    with pytest.raises(ValueError, match="milestone grid"):
        sampler_timesteps(2, b, "karras", sd3)


def test_the_exported_schedulers_pick_the_same_sigma_grid():
    """Both shipped schedulers keep their own copy of the rule; every step count, grid and shift agrees."""
    from tlcm_core.flow_schedule import FlowSchedule, calculate_mu
    from tlcm_core.flow_scheduler import FlowMatchTLCMScheduler
    from tlcm_core.scheduler import TLCMScheduler

    for T, M in [(1000, 8), (1000, 4), (1000, 16), (500, 8)]:
        b = milestones(T, M)
        for n in range(1, M + 1):
            for shift in (1.0, 3.0, 6.0):
                s = FlowMatchTLCMScheduler(num_train_timesteps=T, segments=M, shift=shift, milestone_grid="sigma")
                s.set_timesteps(n)
                fs = FlowSchedule.from_config({"num_train_timesteps": T, "shift": shift})
                assert s.step_indices.tolist() == sampler_timesteps(n, b, "sigma", fs), (T, M, n, shift)
            dyn = {"num_train_timesteps": T, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096}
            s = FlowMatchTLCMScheduler(**dyn, segments=M, milestone_grid="sigma")
            s.set_timesteps(n, mu=calculate_mu(4096))
            fs = FlowSchedule.from_config(dyn, image_seq_len=4096)
            assert s.step_indices.tolist() == sampler_timesteps(n, b, "sigma", fs), (T, M, n, "dynamic")
            u = TLCMScheduler(num_train_timesteps=T, segments=M, milestone_grid="sigma")
            u.set_timesteps(n)
            ns = NoiseSchedule.from_config({"num_train_timesteps": T})
            assert u.timesteps.tolist() == sampler_timesteps(n, b, "sigma", ns), (T, M, n, "unet")
    with pytest.raises(ValueError, match="milestone_grid"):
        FlowMatchTLCMScheduler(milestone_grid="even")
    with pytest.raises(ValueError, match="milestone_grid"):
        TLCMScheduler(milestone_grid="even")
