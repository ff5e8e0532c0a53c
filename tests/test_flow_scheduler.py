"""FlowMatchTLCMScheduler inside stock FluxPipeline / StableDiffusion3Pipeline reproduces tlcm_core's own sampler
(FlowSchedule + samplers.tlcm_sample) bit for bit, at the milestones' shifted training sigmas
(docs/flow-matching.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_flow import FLUX_DEV_SCHEDULER, MAX_SEQ, PROMPTS, RES, SD35_SCHEDULER, tiny_flux, tiny_sd3

from tlcm_core.flow_schedule import FlowSchedule, calculate_mu
from tlcm_core.flow_scheduler import FlowMatchTLCMScheduler
from tlcm_core.samplers import tlcm_sample
from tlcm_core.schedule import milestones, sampler_timesteps

CPU = torch.device("cpu")
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's embedded guidance value: one forward pass per step, no CFG batch


@pytest.fixture(scope="module")
def pipes():
    return {"flux": tiny_flux(), "sd3": tiny_sd3()}


# -- the reference: tlcm_core's own sampler, calling the transformer as each pipeline does ---------------------------


def _pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 latent packing: (B, C, H, W) -> (B, H/2 * W/2, 4C), channels then the 2x2 offsets."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    """Position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux_x0_fn(pipe, fs: FlowSchedule, n: int):
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, device=CPU,
                                                  max_sequence_length=MAX_SEQ)
    img_ids = _flux_image_ids(RES // 4, RES // 4)  # latents RES/2, packed 2x2
    guidance = torch.full((n,), FLUX_GUIDANCE, dtype=torch.float32)

    def x0_fn(x, t):
        # FluxPipeline hands the transformer timestep / 1000 (sigma); the transformer scales it back by 1000
        v = pipe.transformer(hidden_states=x, timestep=fs.model_timestep(t).float() / 1000, guidance=guidance,
                             pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                             img_ids=img_ids, return_dict=False)[0]
        return fs.to_x0_eps(v, x, t)[0]

    return x0_fn


def _sd3_x0_fn(pipe, fs: FlowSchedule):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device=CPU,
                                              do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ)

    def x0_fn(x, t):
        # StableDiffusion3Pipeline hands the transformer timestep = sigma * 1000 as it is
        v = pipe.transformer(hidden_states=x, timestep=fs.model_timestep(t).float(), encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0]
        return fs.to_x0_eps(v, x, t)[0]

    return x0_fn


@torch.no_grad()
def reference_latents(family: str, pipe, base_config: dict, steps: int, seed: int, mode: str,
                      grid: str = "official") -> torch.Tensor:
    """x_T and the re-noising drawn from one CPU generator, as tlcm_sample draws them."""
    n = len(PROMPTS)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 4, RES // 2, RES // 2), generator=g)
    if family == "flux":
        x_T = _pack(x_T)
        fs = FlowSchedule.from_config(base_config, image_seq_len=x_T.shape[1])
        x0_fn = _flux_x0_fn(pipe, fs, n)
    else:
        fs = FlowSchedule.from_config(base_config)
        x0_fn = _sd3_x0_fn(pipe, fs)
    return tlcm_sample(x0_fn, x_T, sampler_timesteps(steps, milestones(1000, 8), grid, fs), fs, mode=mode, generator=g)


def pipeline_latents(family: str, pipe, steps: int, seed: int) -> torch.Tensor:
    """The stock pipeline with whatever scheduler it holds; its generator also feeds the scheduler's re-noising."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(pipe.scheduler, FlowMatchTLCMScheduler):
        pipe.scheduler.set_noise_generator(g)
    # SD3: guidance_scale <= 1 turns CFG off (do_classifier_free_guidance is guidance_scale > 1); FLUX.1-dev's
    # guidance is an embedding, and true CFG stays off (true_cfg_scale 1, no negative prompt)
    guidance = FLUX_GUIDANCE if family == "flux" else 1.0
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
                max_sequence_length=MAX_SEQ, generator=g, output_type="latent").images


def _record_transformer_calls(transformer) -> tuple[list, object]:
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["timestep"].clone(), kwargs["hidden_states"].shape[0]))

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


# -- inside the stock pipelines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("steps,mode,grid", [(2, "renoise", "official"), (4, "renoise", "official"),
                                            (4, "multistep", "official"), (2, "renoise", "sigma"),
                                            (3, "multistep", "sigma")])
def test_scheduler_in_stock_pipeline_equals_tlcm_sample(pipes, family, steps, mode, grid):
    """Bit-exact (torch.equal): the same float64 sigmas cast to float32 at the same points, the same float32
    operations in the same order, the same transformer inputs and the same noise draws; on either milestone grid
    (the sigma grid chosen at the shift FLUX's pipeline passes for this image size)."""
    pipe = pipes[family]
    base = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchTLCMScheduler.from_base(base.config, sampler=mode, milestone_grid=grid)
        calls, handle = _record_transformer_calls(pipe.transformer)
        try:
            out = pipeline_latents(family, pipe, steps, seed=3)
        finally:
            handle.remove()
        ref = reference_latents(family, pipe, dict(base.config), steps, seed=3, mode=mode, grid=grid)
        assert torch.equal(out, ref), (out - ref).abs().max()
        # one transformer pass per step, on the batch itself (no CFG batch)
        assert len(calls) == steps and all(n == len(PROMPTS) for _, n in calls)
        _check_visited_sigmas(family, pipe.scheduler, dict(base.config), [t for t, _ in calls], steps, grid)
    finally:
        pipe.scheduler = base


def _check_visited_sigmas(family, sched, base_config, timesteps, steps, grid="official"):
    """The transformer saw the milestones' shifted training sigmas, and diffusers' own scheduler gives the same
    sigmas for those indices (up to its float32 arithmetic)."""
    seq = (RES // 4) ** 2 if family == "flux" else None
    fs = FlowSchedule.from_config(base_config, image_seq_len=seq)
    idx = sampler_timesteps(steps, milestones(1000, 8), grid, fs)
    assert sched.step_indices.tolist() == idx
    assert torch.equal(sched._sigmas64, fs.sigmas[idx])
    expected = fs.model_timestep(torch.tensor(idx)).float()
    seen = torch.stack([t[0] for t in timesteps])
    assert torch.equal(seen, expected / 1000 if family == "flux" else expected)
    ref = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if family == "flux" else SD35_SCHEDULER))
    mu = calculate_mu(seq, 256, 4096, 0.5, 1.15) if family == "flux" else None
    ref.set_timesteps(sigmas=[(i + 1) / 1000 for i in idx], mu=mu)  # diffusers shifts the levels we ask for
    torch.testing.assert_close(sched.sigmas, ref.sigmas, rtol=1e-6, atol=0)  # both end with the terminal 0
    torch.testing.assert_close(sched.timesteps, ref.timesteps, rtol=1e-6, atol=0)


def test_without_our_scheduler_the_pipelines_differ(pipes):
    """Sanity: the stock Euler scheduler gives other latents, so equality above is not vacuous."""
    for family in ("flux", "sd3"):
        stock = pipeline_latents(family, pipes[family], 2, seed=3)
        ref = reference_latents(family, pipes[family], dict(pipes[family].scheduler.config), 2, 3, "renoise")
        assert not torch.allclose(stock, ref, atol=1e-3)


# -- the scheduler on its own ------------------------------------------------------------------------------------------


def test_timesteps_are_the_milestone_subsets():
    for T, M in [(1000, 8), (1000, 4), (1000, 10), (500, 8)]:
        for n in range(1, M + 1):
            s = FlowMatchTLCMScheduler(num_train_timesteps=T, segments=M, shift=3.0)
            s.set_timesteps(n)
            assert s.step_indices.tolist() == sampler_timesteps(n, milestones(T, M)), (T, M, n)
            fs = FlowSchedule.from_config({"num_train_timesteps": T, "shift": 3.0})
            assert torch.equal(s._sigmas64, fs.sigmas[s.step_indices])
            assert torch.equal(s.timesteps, fs.model_timestep(s.step_indices).float())
            assert s.sigmas[-1] == 0 and len(s.sigmas) == n + 1 and len(s.timesteps) == n


def test_set_timesteps_takes_what_the_pipelines_pass_and_refuses_the_rest():
    s = FlowMatchTLCMScheduler.from_base(FLUX_DEV_SCHEDULER)
    mu = calculate_mu(64)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), device="cpu", mu=mu)  # as FluxPipeline calls it
    assert s.step_indices.tolist() == [999, 749, 499, 124] and s.num_inference_steps == 4 and s.mu == mu
    flux64 = FlowSchedule.from_config(FLUX_DEV_SCHEDULER, image_seq_len=64)
    assert torch.equal(s._sigmas64, flux64.sigmas[s.step_indices])
    with pytest.raises(ValueError, match="custom sigmas"):
        s.set_timesteps(sigmas=[1.0, 0.3], mu=mu)
    with pytest.raises(ValueError, match="pass mu"):
        s.set_timesteps(4)
    with pytest.raises(ValueError, match="use 1..8 steps"):
        s.set_timesteps(9, mu=mu)
    with pytest.raises(ValueError, match="2 sigmas"):
        s.set_timesteps(3, sigmas=np.linspace(1.0, 0.5, 2), mu=mu)
    fixed = FlowMatchTLCMScheduler.from_base(SD35_SCHEDULER)
    fixed.set_timesteps(2, mu=0.7)  # mu is ignored without dynamic shifting, as FlowMatchEulerDiscreteScheduler does
    assert fixed.mu is None
    assert torch.equal(fixed._sigmas64, FlowSchedule.from_config(SD35_SCHEDULER).sigmas[[999, 499]])
    with pytest.raises(ValueError, match="sampler"):
        FlowMatchTLCMScheduler(sampler="euler")


def test_from_base_keeps_the_shift_and_refuses_what_it_cannot_honour():
    flux = FlowMatchTLCMScheduler.from_base(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER).config)
    assert {k: flux.config[k] for k in FLUX_DEV_SCHEDULER} == FLUX_DEV_SCHEDULER
    sd3_base = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER).config
    sd3 = FlowMatchTLCMScheduler.from_base(sd3_base, sampler="multistep")
    assert (sd3.config.shift, sd3.config.use_dynamic_shifting, sd3.config.sampler) == (3.0, False, "multistep")
    for bad in ({"shift_terminal": 0.1}, {"invert_sigmas": True}, {"use_beta_sigmas": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FlowMatchTLCMScheduler.from_base({**SD35_SCHEDULER, **bad})


def test_config_round_trip(tmp_path):
    for name, base in (("flux", FLUX_DEV_SCHEDULER), ("sd3", SD35_SCHEDULER)):
        s = FlowMatchTLCMScheduler.from_base(base, sampler="multistep", segments=6)
        s.save_pretrained(tmp_path / name)
        r = FlowMatchTLCMScheduler.from_pretrained(tmp_path / name)
        assert type(r) is FlowMatchTLCMScheduler
        assert {k: v for k, v in r.config.items() if not k.startswith("_")} == \
               {k: v for k, v in s.config.items() if not k.startswith("_")}
        mu = calculate_mu(1024) if name == "flux" else None
        for x in (s, r):
            x.set_timesteps(3, mu=mu)
        assert torch.equal(r.timesteps, s.timesteps) and torch.equal(r.sigmas, s.sigmas)


def test_step_and_scale_noise_math():
    """One step against FlowSchedule by hand (renoise, multistep, the last step's x0), scale_noise as img2img pipelines
    use it, bfloat16 latents stepped in float32, and the generator passed to step() taking precedence."""
    fs = FlowSchedule.from_config(SD35_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x0 = fs.to_x0_eps(v, x, 999)[0]
    s = FlowMatchTLCMScheduler.from_base(SD35_SCHEDULER)
    s.set_timesteps(2)
    out = s.step(v, s.timesteps[0], x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.denoised, x0)
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.prev_sample, fs.add_noise(x0, fresh, 499))
    last = s.step(v, s.timesteps[1], out.prev_sample)
    assert torch.equal(last.prev_sample, last.denoised)
    with pytest.raises(ValueError, match="steps are done"):
        s.step(v, s.timesteps[1], x)
    m = FlowMatchTLCMScheduler.from_base(SD35_SCHEDULER, sampler="multistep")
    m.set_timesteps(2)
    torch.testing.assert_close(m.step(v, 1000.0, x).prev_sample, x + (fs.sigmas[499] - 1).float() * v,
                               rtol=1e-6, atol=1e-6)
    m.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of"):
        m.step(v, 999.0, x)  # an index, not one of the timesteps (sigma * 1000)
    # scale_noise: by timestep value, and at the begin index an img2img pipeline sets
    noise = torch.randn(x.shape, generator=g)
    s.set_timesteps(4)
    assert torch.equal(s.scale_noise(x, s.timesteps[2:3], noise), fs.add_noise(x, noise, 499))
    s.set_begin_index(1)
    assert torch.equal(s.scale_noise(x, s.timesteps[1:2], noise), fs.add_noise(x, noise, 749))
    # the noise generator: step()'s own first, then set_noise_generator's
    s.set_noise_generator(torch.Generator().manual_seed(5))
    for gen, seed in ((torch.Generator().manual_seed(1), 1), (None, 5)):
        s.set_timesteps(2)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(s.step(v, s.timesteps[0], x, generator=gen).prev_sample, fs.add_noise(x0, noise, 499))
    # bfloat16 latents: computed in float32, returned in bfloat16
    s.set_timesteps(2)
    half = s.step(v.bfloat16(), s.timesteps[0], x.bfloat16(), generator=torch.Generator().manual_seed(1)).prev_sample
    s.set_timesteps(2)
    full = s.step(v.bfloat16().float(), s.timesteps[0], x.bfloat16().float(),
                  generator=torch.Generator().manual_seed(1)).prev_sample
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.bfloat16())


def test_the_scheduler_file_runs_on_its_own(tmp_path):
    """flow_scheduler.py can ship as a copy beside an exported LoRA: no tlcm_core import, and the copy loads a saved
    config and samples the same timesteps."""
    import importlib.util
    import shutil

    import tlcm_core.flow_scheduler as ours

    src = shutil.copy(ours.__file__, tmp_path / "scheduling_flow_tlcm.py")
    lines = open(src).read().splitlines()
    assert "tlcm_core" not in "\n".join(ln for ln in lines if ln.startswith(("import", "from")))
    spec = importlib.util.spec_from_file_location("scheduling_flow_tlcm", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    FlowMatchTLCMScheduler.from_base(FLUX_DEV_SCHEDULER).save_pretrained(tmp_path / "scheduler")
    copy = mod.FlowMatchTLCMScheduler.from_pretrained(tmp_path / "scheduler")
    copy.set_timesteps(4, mu=calculate_mu(4096))
    ref = FlowMatchTLCMScheduler.from_base(FLUX_DEV_SCHEDULER)
    ref.set_timesteps(4, mu=calculate_mu(4096))
    assert torch.equal(copy.timesteps, ref.timesteps) and copy.step_indices.tolist() == [999, 749, 499, 124]
