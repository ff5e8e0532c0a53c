"""The exported TLCM LoRA + TLCMScheduler where users put them: StableDiffusionXLControlNetPipeline, stacked with a
second (style) LoRA, and at a non-default resolution -- on the tiny random SDXL-shaped base."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_lora import diffusers_export, PROMPTS, fresh_pipe, pipeline_latents, reference_latents, teacher, trained_lora

from tlcm_core.config import LoRAConfig
from tlcm_core.lora_files import base_configs, export_files, write_files
from tlcm_core.scheduler import TLCMScheduler

EXACT = dict(rtol=0.0, atol=0.0)
STEPS, SEED = 2, 21


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return diffusers_export(tmp_path_factory.mktemp("export"))


def _tlcm(pipe, export_dir):
    pipe.scheduler = TLCMScheduler.from_pretrained(export_dir, subfolder="scheduler")
    pipe.load_lora_weights(str(export_dir / "diffusers"), adapter_name="tlcm")
    return pipe


def test_controlnet_pipeline(export_dir):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    base = fresh_pipe()
    # a tiny random ControlNet: the UNet's encoder copied (from_unet), its zero convolutions made non-zero
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=controlnet, scheduler=base.scheduler,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    _tlcm(pipe, export_dir)
    control = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())] * 2

    with_lora = pipeline_latents(pipe, STEPS, SEED, image=control)
    assert with_lora.shape == (2, 4, 16, 16) and torch.isfinite(with_lora).all()
    pipe.disable_lora()
    assert (pipeline_latents(pipe, STEPS, SEED, image=control) - with_lora).abs().max() > 0.5
    pipe.enable_lora()
    # the control signal acts; at conditioning scale 0 the ControlNet pipeline is exactly the plain TLCM sampler
    ref = reference_latents(trained_lora()[0], STEPS, SEED)
    assert (with_lora - ref).abs().max() > 1e-3
    torch.testing.assert_close(pipeline_latents(pipe, STEPS, SEED, image=control, controlnet_conditioning_scale=0.0),
                               ref, **EXACT)
    # and it decodes to images
    images = pipe(prompt=PROMPTS, image=control, num_inference_steps=STEPS, guidance_scale=0.0,
                  generator=torch.Generator().manual_seed(SEED)).images
    assert [im.size for im in images] == [(32, 32), (32, 32)]


def test_stacked_with_a_style_lora(export_dir, tmp_path):
    pipe = _tlcm(fresh_pipe(), export_dir)
    # the style LoRA as people download them: a kohya-format file (another rank and alpha)
    style_state, style_meta = trained_lora(seed=9, lora=LoRAConfig(rank=2, alpha=1), std=0.05)
    write_files(export_files(style_state, style_meta, ["kohya"], *base_configs(teacher()), segments=8), str(tmp_path))
    pipe.load_lora_weights(str(tmp_path / "kohya"), weight_name="tlcm_lora.safetensors", adapter_name="style")
    ref = reference_latents(trained_lora()[0], STEPS, SEED)

    pipe.set_adapters(["tlcm", "style"], adapter_weights=[1.0, 0.0])
    torch.testing.assert_close(pipeline_latents(pipe, STEPS, SEED), ref, **EXACT)
    pipe.set_adapters(["tlcm", "style"], adapter_weights=[1.0, 0.8])
    stacked = pipeline_latents(pipe, STEPS, SEED)
    assert (stacked - ref).abs().max() > 1e-2 and torch.isfinite(stacked).all()
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    assert (pipeline_latents(pipe, STEPS, SEED) - stacked).abs().max() > 1e-2
    pipe.set_adapters(["tlcm"])
    torch.testing.assert_close(pipeline_latents(pipe, STEPS, SEED), ref, **EXACT)


def test_non_default_resolution(export_dir):
    """48x48 images (24x24 latents) on a base that trained at 32: the SDXL micro-conditioning follows the size."""
    pipe = _tlcm(fresh_pipe(48), export_dir)
    got = pipeline_latents(pipe, STEPS, SEED, resolution=48)
    assert got.shape == (2, 4, 24, 24)
    torch.testing.assert_close(got, reference_latents(trained_lora()[0], STEPS, SEED, resolution=48), **EXACT)
    images = pipe(prompt=PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=0.0, height=48, width=64,
                  generator=torch.Generator().manual_seed(SEED)).images
    assert images[0].size == (64, 48)
