"""Samplers and LoRA plumbing on a tiny random SDXL-shaped teacher."""

import pytest
import torch
from diffusers import DDIMScheduler

from tlcm_core.config import LoRAConfig, TeacherConfig
from tlcm_core.lora import LoRAError, attach_lora, check_lora, load_lora_into, lora_metadata, lora_state_dict
from tlcm_core.models import Denoiser, encode_prompts, load_pipeline
from tlcm_core.samplers import ddim_sample, student_x0_fn, teacher_x0_fn, tlcm_sample, tlcm_states
from tlcm_core.schedule import NoiseSchedule, ddim_timesteps, milestones, sampler_timesteps


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tlcm_core.toy.pipeline import build_toy_pipeline

    path = tmp_path_factory.mktemp("t") / "tiny"
    build_toy_pipeline(seed=5).save_pretrained(path)
    return load_pipeline(TeacherConfig(source=str(path), resolution=32), torch.device("cpu"))


def test_teacher_sampler_equals_diffusers_ddim_with_cfg(pipe):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing")
    w, n = 5.0, 4
    sched.set_timesteps(n)
    prompts = ["a red circle", "a blue square"]
    cond, uncond = encode_prompts(pipe, prompts, 32)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    ours = ddim_sample(teacher_x0_fn(Denoiser(pipe.unet, schedule), cond, uncond, w), x_T, ddim_timesteps(n),
                       schedule)
    # reference: diffusers' own step, with CFG written out, and its final x0 prediction
    x = x_T.clone()
    unc = uncond.expand(2)
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((2,), int(t))
            eu = pipe.unet(x, tt, **unc.unet_kwargs()).sample
            ec = pipe.unet(x, tt, **cond.unet_kwargs()).sample
            out = sched.step(eu + w * (ec - eu), t, x)
            x, x0 = out.prev_sample, out.pred_original_sample
    torch.testing.assert_close(ours, x0, rtol=1e-4, atol=1e-4)


def test_tlcm_sampler_forms(pipe):
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    cond, _ = encode_prompts(pipe, ["a red circle"] * 2, 32)
    fn = student_x0_fn(Denoiser(pipe.unet, schedule), cond)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ts = sampler_timesteps(4, milestones(1000, 8))
    a = tlcm_sample(fn, x_T, ts, schedule, mode="renoise", generator=torch.Generator().manual_seed(3))
    b = tlcm_sample(fn, x_T, ts, schedule, mode="renoise", generator=torch.Generator().manual_seed(3))
    c = tlcm_sample(fn, x_T, ts, schedule, mode="multistep")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one step: both forms are the x0 prediction at t = 999
    one = tlcm_sample(fn, x_T, [999], schedule, mode="multistep")
    torch.testing.assert_close(one, fn(x_T, torch.full((2,), 999)))
    # multistep with the teacher's own x0 through milestones == deterministic DDIM on those timesteps
    torch.testing.assert_close(c, ddim_sample(fn, x_T, ts, schedule))


def test_tlcm_states_are_the_sampler_step_by_step_and_lazy(pipe):
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    cond, _ = encode_prompts(pipe, ["a red circle"] * 2, 32)
    fn = student_x0_fn(Denoiser(pipe.unet, schedule), cond)
    calls = []
    counted = lambda x, t: calls.append(int(t[0])) or fn(x, t)  # noqa: E731
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ts = sampler_timesteps(4, milestones(1000, 8))
    for mode in ("renoise", "multistep"):
        calls.clear()
        items = list(tlcm_states(counted, x_T, ts, schedule, mode, generator=torch.Generator().manual_seed(3)))
        assert len(items) == len(ts) + 1 and items[0] is x_T and calls == ts
        sample = tlcm_sample(fn, x_T, ts, schedule, mode=mode, generator=torch.Generator().manual_seed(3))
        assert torch.equal(items[-1], sample)
    calls.clear()  # the first two states cost one call: the model at ts[0]
    run = tlcm_states(counted, x_T, ts, schedule, generator=torch.Generator().manual_seed(3))
    first_two = [next(run), next(run)]
    assert calls == ts[:1] and not torch.equal(first_two[0], first_two[1])
    with pytest.raises(ValueError, match="unknown sampler mode"):
        next(tlcm_states(fn, x_T, ts, schedule, mode="ancestral"))


def test_lora_round_trip_and_checks(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = pipe.unet
    lcfg = LoRAConfig(rank=4, alpha=4)
    attach_lora(unet, lcfg, adapter_name="t1")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n and ".t1." in n:
                p.normal_()
    sd = lora_state_dict(unet, adapter_name="t1")
    assert sd and all(k.startswith("unet.") for k in sd)
    base = {"source": "tiny"}
    save_file(sd, tmp_path / "l.safetensors", metadata=lora_metadata(lcfg, base))
    from safetensors import safe_open

    with safe_open(tmp_path / "l.safetensors", "pt") as f:
        meta = f.metadata()
    loaded = load_file(tmp_path / "l.safetensors")
    assert check_lora(loaded, meta, lcfg, base).rank == 4
    with pytest.raises(LoRAError, match="rank 4 does not match lora.rank=8"):
        check_lora(loaded, meta, LoRAConfig(rank=8), base)
    with pytest.raises(LoRAError, match="trained on base model"):
        check_lora(loaded, meta, lcfg, {"source": "other"})
    with pytest.raises(LoRAError, match="not a TLCM LoRA"):
        check_lora(loaded, {}, lcfg, base)
    # loading into a fresh adapter reproduces the same outputs
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond, _ = encode_prompts(pipe, ["a red circle"], 32)
    with torch.no_grad():
        ref = unet(x, t, **cond.unet_kwargs()).sample
        load_lora_into(unet, loaded, lcfg, adapter_name="t2")
        again = unet(x, t, **cond.unet_kwargs()).sample
    torch.testing.assert_close(again, ref)
    with pytest.raises(LoRAError):
        load_lora_into(unet, {k: v for k, v in list(loaded.items())[:-2]}, lcfg, adapter_name="t3")
