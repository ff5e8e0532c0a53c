"""Model families (tlcm_core/families/): the denoiser of each family computes what its stock diffusers pipeline
computes, guidance on the raw output equals guidance on eps, prompts are encoded as the pipeline encodes them, the
VAE's scale and shift are applied, and `teacher.family` picks (or refuses) the family. Tiny offline FLUX.1-dev- and
SD3.5-shaped pipelines from tests/tiny_flow.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_flow import MAX_SEQ, PROMPTS, RES, tiny_flux, tiny_sd3

from tlcm_core.conditioning import Conditioning
from tlcm_core.config import TeacherConfig
from tlcm_core.families import FLUX, SD3, UNET, TeacherError, family_of
from tlcm_core.families.flux import image_ids, pack_latents, unpack_latents
from tlcm_core.flow_schedule import FlowSchedule
from tlcm_core.flow_scheduler import FlowMatchTLCMScheduler
from tlcm_core.models import (Denoiser, check_teacher, decode_latents, encode_images, encode_prompts, latent_shape,
                              load_pipeline, load_schedule, load_unet, teacher_denoiser, teacher_family)
from tlcm_core.schedule import NoiseSchedule, cfg, milestones, sampler_timesteps

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipes():
    return {"flux": tiny_flux(), "sd3": tiny_sd3()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipes):
    """Both tiny pipelines saved as diffusers folders, as a user's teacher.source would be."""
    root = tmp_path_factory.mktemp("teachers")
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
    return root


# -- guidance on the raw output ---------------------------------------------------------------------------------------


class Affine(torch.nn.Module):
    """A stand-in network whose output depends on x, t and the text (for the math; called as a UNet)."""

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False, **kw):
        shift = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return (0.3 * x + shift + t.float().reshape(-1, 1, 1, 1) / 2000,)


def _old_guided(model: Denoiser, x_t, t, cond, uncond, w):
    """What Denoiser.guided computed before the families: CFG on eps, then x0 = (x_t - s eps) / a."""
    n = x_t.shape[0]
    _, eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond.expand(n), cond]))
    eps = cfg(eps[:n], eps[n:], w)
    a, s = model.schedule.coeffs(t, x_t)
    return (x_t - s * eps) / a, eps


SCHEDULES = {
    "epsilon": NoiseSchedule.from_config({"prediction_type": "epsilon"}),
    "v_prediction": NoiseSchedule.from_config({"prediction_type": "v_prediction"}),
    "flow": FlowSchedule.from_config({"shift": 3.0}),
}


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_guidance_on_the_raw_output_equals_guidance_on_eps(kind):
    """CFG is linear, and so is every output -> (x0, eps) conversion: guiding the raw output (what the families do)
    equals guiding eps and dividing by a_t (what the UNet path did), bit for bit for epsilon models, to float
    tolerance for v and flow (in float64: near a flow's pure noise the old form divides by a_t = 1 - sigma ~ 3e-4 at
    index 998 and float32 loses three digits there). At sigma = 1 (a_t = 0) only the new form is finite."""
    model = Denoiser(Affine(), SCHEDULES[kind])
    assert model.family is UNET
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        cond = Conditioning(torch.randn(3, 5, 6, generator=g, dtype=dtype))
        uncond = Conditioning(torch.randn(1, 5, 6, generator=g, dtype=dtype))
        t = torch.tensor([998, 500, 3])
        new, old = model.guided(x, t, cond, uncond, 7.5), _old_guided(model, x, t, cond, uncond, 7.5)
        if kind == "epsilon":
            assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
        elif dtype == torch.float64:
            torch.testing.assert_close(new, old, rtol=1e-9, atol=1e-9)
    if kind == "flow":
        top = torch.full((3,), 999)
        assert torch.isfinite(model.guided(x, top, cond, uncond, 7.5)[0]).all()
        assert not torch.isfinite(_old_guided(model, x, top, cond, uncond, 7.5)[0]).all()


# -- each family's denoiser is its stock pipeline's transformer call ------------------------------------------------


def _hook_step(transformer, step: int):
    """Record the kwargs and output of the pipeline's transformer call at `step` (0-based)."""
    seen: list = []

    def hook(module, args, kwargs, output):
        seen.append((kwargs, output[0].detach().clone()))

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    return seen, handle


def _run_stock(pipe, steps: int, guidance: float, step: int):
    base = pipe.scheduler
    pipe.scheduler = FlowMatchTLCMScheduler.from_base(base.config, sampler="multistep")  # milestones' sigmas
    seen, handle = _hook_step(pipe.transformer, step)
    try:
        pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
             max_sequence_length=MAX_SEQ, generator=torch.Generator().manual_seed(1), output_type="latent")
    finally:
        handle.remove()
        pipe.scheduler = base
    return seen[step]


@torch.no_grad()
def test_flux_denoiser_is_the_stock_pipelines_call(pipes):
    """FLUX.1-dev with embedded guidance 3.5, hooked at the second of two steps (index 499): our denoiser, given the
    unpacked latents, returns x0 = x - sigma v and eps = x + (1 - sigma) v of the stock call's own output v, and
    calls the transformer with the same inputs (packing, ids, timestep, guidance: one pass, no CFG batch)."""
    pipe = pipes["flux"]
    kwargs, v = _run_stock(pipe, steps=2, guidance=3.5, step=1)
    t = sampler_timesteps(2, milestones(1000, 8))[1]
    x_t = unpack_latents(kwargs["hidden_states"], RES // 2, RES // 2)
    assert torch.equal(pack_latents(x_t), kwargs["hidden_states"])
    model = teacher_denoiser(pipe, RES)
    cond, uncond = encode_prompts(pipe, PROMPTS, RES, max_sequence_length=MAX_SEQ)
    x0, eps = model.guided(x_t, torch.full((2,), t), cond, uncond, 3.5)
    sigma = model.schedule.sigmas[t].float()
    torch.testing.assert_close(x0, unpack_latents(kwargs["hidden_states"] - sigma * v, RES // 2, RES // 2),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(eps, unpack_latents(kwargs["hidden_states"] + (1 - sigma) * v, RES // 2, RES // 2),
                               rtol=0, atol=1e-6)
    seen, handle = _hook_step(pipe.transformer, 0)
    try:
        model.guided(x_t, torch.full((2,), t), cond, uncond, 3.5)
    finally:
        handle.remove()
    (ours, _), = seen
    for k in ("timestep", "guidance", "pooled_projections", "encoder_hidden_states", "txt_ids", "img_ids"):
        assert torch.equal(ours[k], kwargs[k]), k
    # unguided (the student's call): embedded guidance 1, the same as guided with w = 1
    torch.testing.assert_close(model(x_t, t, cond), model.guided(x_t, torch.full((2,), t), cond, uncond, 1.0))


@torch.no_grad()
def test_sd3_denoiser_is_the_stock_pipelines_call(pipes):
    """SD3.5 with true CFG 3.0, hooked at the second of two steps: the stock call's batch is [uncond, cond]; our
    guided x0/eps equal x - sigma v_cfg and x + (1 - sigma) v_cfg of its output, v_cfg = v_u + 3 (v_c - v_u)."""
    pipe = pipes["sd3"]
    kwargs, out = _run_stock(pipe, steps=2, guidance=3.0, step=1)
    t = sampler_timesteps(2, milestones(1000, 8))[1]
    x_t = kwargs["hidden_states"][2:]
    model = teacher_denoiser(pipe, RES)
    cond, uncond = encode_prompts(pipe, PROMPTS, RES, max_sequence_length=MAX_SEQ)
    x0, eps = model.guided(x_t, torch.full((2,), t), cond, uncond, 3.0)
    v = out[:2] + 3.0 * (out[2:] - out[:2])
    sigma = model.schedule.sigmas[t].float()
    torch.testing.assert_close(x0, x_t - sigma * v, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps, x_t + (1 - sigma) * v, rtol=0, atol=1e-6)
    assert torch.equal(model.schedule.model_timestep(t).float().expand(4), kwargs["timestep"])


def test_flux_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    assert torch.equal(FluxPipeline._unpack_latents(pack_latents(x), 6 * 8, 8 * 8, 8), x)
    assert torch.equal(image_ids(3, 4, CPU, torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 4, CPU,
                                                                                                     torch.float32))


# -- prompts, latents, VAE --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_prompt_encoding_is_the_pipelines_encode_prompt(pipes):
    flux = pipes["flux"]
    cond, uncond = encode_prompts(flux, PROMPTS, RES, batch_size=1, max_sequence_length=MAX_SEQ)
    pe, pooled, text_ids = flux.encode_prompt(prompt=PROMPTS, prompt_2=None, device=CPU, max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(cond.prompt_embeds, pe)  # batch_size=1 encodes one prompt a batch
    torch.testing.assert_close(cond.pooled, pooled)
    assert torch.equal(cond.text_ids, text_ids.expand(2, -1, -1)) and cond.time_ids is None and cond.guidance is None
    npe, npooled, _ = flux.encode_prompt(prompt=[""], prompt_2=None, device=CPU, max_sequence_length=MAX_SEQ)
    assert torch.equal(uncond.prompt_embeds, npe) and torch.equal(uncond.pooled, npooled)

    sd3 = pipes["sd3"]
    cond, uncond = encode_prompts(sd3, PROMPTS, RES, max_sequence_length=MAX_SEQ)
    pe, npe, pooled, npooled = sd3.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device=CPU,
                                                 do_classifier_free_guidance=True, max_sequence_length=MAX_SEQ)
    assert torch.equal(cond.prompt_embeds, pe) and torch.equal(cond.pooled, pooled)
    assert torch.equal(uncond.prompt_embeds, npe[:1]) and torch.equal(uncond.pooled, npooled[:1])
    assert cond.text_ids is None and cond.time_ids is None
    assert pe.shape[1] == 77 + MAX_SEQ  # the joint sequence: CLIP tokens, then T5's


def test_conditioning_batching_carries_every_field():
    c = Conditioning(torch.randn(3, 4, 2), torch.randn(3, 5), text_ids=torch.zeros(3, 4, 3),
                     guidance=torch.tensor([1.0, 2.0, 3.0]))
    both = Conditioning.cat([c[torch.tensor([2])].expand(2), c[1:]])
    assert torch.equal(both.guidance, torch.tensor([3.0, 3.0, 2.0, 3.0])) and both.text_ids.shape == (4, 4, 3)
    again = Conditioning.from_tensors(both.tensors("cond/"), "cond/")
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), both.tensors().values()))
    old = Conditioning.from_tensors({"prompt_embeds": c.prompt_embeds, "pooled": c.pooled})  # a cache of before
    assert old.text_ids is None and old.guidance is None and old.time_ids is None
    assert c.to(dtype=torch.float64).guidance.dtype == torch.float64


def test_latent_shapes_per_family(pipes):
    assert latent_shape(pipes["flux"], RES) == (4, RES // 2, RES // 2)  # 16 packed channels = 4 x 2x2
    assert latent_shape(pipes["sd3"], RES) == (4, RES // 2, RES // 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        latent_shape(pipes["flux"], RES + 2)  # 17 latents a side cannot pack 2x2


@torch.no_grad()
def test_vae_round_trip_uses_scale_and_shift(pipes):
    """FLUX's VAE numbers (scale 0.3611, shift 0.1159): latents are (z - shift) * scale of the VAE's mean, decoding
    inverts that exactly as FluxPipeline does, and a round trip equals the VAE's own."""
    vae = tiny_flux().vae  # a fresh copy: its config is changed below
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    img = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    z = vae.encode(img * 2 - 1).latent_dist.mean
    lat = encode_images(vae, img)
    torch.testing.assert_close(lat, (z - 0.1159) * 0.3611)
    out = decode_latents(SimpleNamespace(vae=vae), lat)
    stock = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    torch.testing.assert_close(out, (stock / 2 + 0.5).clamp(0, 1))
    direct = (vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


# -- picking the family ----------------------------------------------------------------------------------------------


def test_teacher_family_is_detected_from_model_index_or_named(saved):
    flux, sd3 = str(saved / "flux"), str(saved / "sd3")
    assert teacher_family(TeacherConfig(source="toy")) is UNET
    assert teacher_family(TeacherConfig(source=flux)) is FLUX and teacher_family(TeacherConfig(source=sd3)) is SD3
    assert teacher_family(TeacherConfig(source=flux, family="flux")) is FLUX
    check_teacher(TeacherConfig(source=flux, family="flux"))
    with pytest.raises(TeacherError, match=r"is a FluxPipeline \(flux\), but teacher.family='sd3'"):
        check_teacher(TeacherConfig(source=flux, family="sd3"))
    with pytest.raises(TeacherError, match=r"StableDiffusionXLPipeline \(unet\), but teacher.family='flux'"):
        check_teacher(TeacherConfig(source="toy", family="flux"))
    with pytest.raises(TeacherError, match="teacher.family='unet'; set teacher.family=auto or sd3"):
        check_teacher(TeacherConfig(source=sd3, family="unet"))


def test_an_unsupported_pipeline_is_one_error_naming_what_is_supported(saved, tmp_path):
    import shutil

    dst = tmp_path / "pixart"
    shutil.copytree(saved / "flux", dst, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(TeacherError) as err:
        check_teacher(TeacherConfig(source=str(dst)))
    msg = str(err.value)
    assert "is a PixArtAlphaPipeline; supported:" in msg and "\n" not in msg
    for name in ("StableDiffusionXLPipeline (unet)", "StableDiffusionPipeline (unet)", "FluxPipeline (flux)",
                 "StableDiffusion3Pipeline (sd3)"):
        assert name in msg


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_loading_a_flow_teacher_from_a_folder(saved, name):
    """load_pipeline, load_unet (the transformer alone) and load_schedule agree with the loaded pipeline."""
    teacher = TeacherConfig(source=str(saved / name), resolution=RES)
    pipe = load_pipeline(teacher, CPU)
    family = family_of(pipe)
    assert family.name == name and not any(p.requires_grad for p in pipe.transformer.parameters())
    net = load_unet(teacher, CPU)
    assert type(net).__name__ == family.network_classes[0] and family_of(net) is family
    assert torch.equal(load_schedule(teacher).sigmas, teacher_denoiser(pipe, RES).schedule.sigmas)
    if name == "flux":  # FLUX shifts by resolution: (32 / 2 / 2)^2 = 64 image tokens here
        other = TeacherConfig(source=str(saved / name), resolution=4 * RES)
        assert not torch.equal(load_schedule(other).sigmas, load_schedule(teacher).sigmas)


def test_prompt_lengths_are_checked_with_the_familys_tokenizers(saved):
    """FLUX reads the T5 sequence (its CLIP gives only the pooled summary, cut at 77 by the pipeline): a prompt longer
    than teacher.max_sequence_length T5 tokens is refused before the teacher loads, naming tokenizer_2."""
    from tlcm_core.prompts import PromptsError, check_prompt_lengths

    teacher = TeacherConfig(source=str(saved / "flux"), max_sequence_length=MAX_SEQ)
    check_prompt_lengths(PROMPTS, teacher)
    long = " ".join(["a red circle"] * 6)  # 19 T5 tokens with </s>
    with pytest.raises(PromptsError, match=f"prompt 2 .* > {MAX_SEQ} allowed by the tokenizer_2"):
        check_prompt_lengths(["a red circle", long], teacher)
    sd3 = TeacherConfig(source=str(saved / "sd3"), max_sequence_length=MAX_SEQ)
    with pytest.raises(PromptsError, match="tokenizer_3"):
        check_prompt_lengths([long], sd3)


# -- the stages on a flow teacher -------------------------------------------------------------------------------------


def test_the_stages_run_a_flux_teacher_from_a_folder(saved, tmp_path):
    """teacher-trajectories, MLCD, lcd-trajectories, LCD and evaluate through run_pipeline with teacher.source the
    tiny FLUX.1-dev folder and no stage knowing it: the pairs are the family denoiser's MDS states and guided jumps
    (recomputed here for a few samples; finite from sigma = 1 on), the conditioning cache holds FLUX's fields, the
    student LoRA adapts the transformer (its export: tests/test_flow_export.py)."""
    import numpy as np

    from tlcm_core.config import load_config
    from tlcm_core.pairs import read_conditioning
    from tlcm_core.pipeline import open_store, run_pipeline
    from tlcm_core.progress import SilentReporter
    from tlcm_core.schedule import ddim, mds_plan
    from tlcm_core.stages.teacher_trajectories import plan_samples

    cfg = load_config("toy-fast", [
        f"teacher.source={saved / 'flux'}", f"teacher.max_sequence_length={MAX_SEQ}", f"store.url={tmp_path}",
        "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,evaluate]", "compute.device=cpu",
        "schedule.guidance=3.5", "trajectories.num_samples=32", "trajectories.shard_size=16", "mlcd.iterations=3",
        "mlcd.batch_size=8", "lcd_trajectories.num_samples=8", "lcd_trajectories.shard_size=8", "lcd_trajectories.q=2",
        "lcd_trajectories.p=2", "lcd.iterations=2", "lcd.batch_size=4", "lora.rank=4", "evaluate.num_samples=4",
        "evaluate.batch_size=4", "evaluate.steps=[1,2]", "evaluate.teacher_steps=[2]", "evaluate.grid_size=2",
        "evaluate.metrics.kind=none"])
    res = run_pipeline(cfg, reporter=SilentReporter())
    assert [r.stage for r in res] == ["teacher-trajectories", "mlcd", "lcd-trajectories", "lcd", "teacher-evaluate",
                                      "evaluate"]
    store = open_store(cfg)
    art = store.artifact("teacher-trajectories", res[0].fingerprint)
    cond_all, uncond = read_conditioning(art, "cond"), read_conditioning(art, "uncond")
    assert cond_all.text_ids.shape == (16, MAX_SEQ, 3) and cond_all.time_ids is None and len(uncond) == 1
    pipe = load_pipeline(cfg.teacher, CPU)
    teacher = teacher_denoiser(pipe, RES)
    bounds = milestones(1000, 8)
    sp = plan_samples(0, 32, base_seed=0, num_prompts=16, shape=(4, 16, 16), bounds=bounds, skip=cfg.schedule.skip)
    x_hi, x_lo = torch.from_numpy(art.open_array("x_hi")[...]), torch.from_numpy(art.open_array("x_lo")[...])
    assert torch.isfinite(x_hi).all() and torch.isfinite(x_lo).all()
    with torch.no_grad():
        for i in (0, 7, 20):
            c, x, plan_ = cond_all[[int(sp.prompt_idx[i])]], sp.noise[i:i + 1], mds_plan(int(sp.t_hi[i]), bounds)
            for t, s in zip(plan_, plan_[1:]):
                x = ddim(teacher.schedule, x, teacher.guided(x, torch.tensor([t]), c, uncond, 3.5)[0], t, s)
            torch.testing.assert_close(x_hi[i:i + 1], x, rtol=1e-4, atol=1e-4)
            x0 = teacher.guided(x, sp.t_hi[i:i + 1], c, uncond, 3.5)[0]
            lo = ddim(teacher.schedule, x, x0, int(sp.t_hi[i]), int(sp.t_lo[i]))
            torch.testing.assert_close(x_lo[i:i + 1], lo, rtol=1e-4, atol=1e-4)
    lora = store.artifact("lcd", res[3].fingerprint).load_tensors("lora.safetensors")
    assert any(".transformer_blocks.0.attn.to_q." in k for k in lora) and all(np.isfinite(v.numpy()).all()
                                                                              for v in lora.values())
    rows = store.artifact("evaluate", res[5].fingerprint).manifest().summary["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("teacher-euler", 2), ("tlcm-renoise", 1),
                                                         ("tlcm-renoise", 2)]
