"""The exported TLCM LoRA + TLCMScheduler with adapters (paper appendix), in stock diffusers on the tiny random
SDXL-shaped base: a T2I-Adapter (StableDiffusionXLAdapterPipeline) and a second, independently made style LoRA
stacked with it (`set_adapters`), at 2, 4 and 8 steps; and `tlcm_pipeline(extra_loras=...)`, the same stacking
merged for sampling."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_lora import diffusers_export, LORA, PROMPTS, fresh_pipe, pipeline_latents, reference_latents, teacher, trained_lora

from tlcm_core.scheduler import TLCMScheduler

EXACT = dict(rtol=0.0, atol=0.0)
SEED = 21
STEPS = [2, 4, 8]
STYLE_RANK, STYLE_ALPHA = 2, 1  # another rank than the TLCM LoRA's 4, and alpha != rank so a lost alpha shows


def _differs(a: torch.Tensor, b: torch.Tensor, by: float) -> bool:
    """Max abs latent difference above `by` (latents here reach |x| ~ 50-70; the effects measured are 0.3 to 15)."""
    return (a - b).abs().max().item() > by


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return diffusers_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def refs():
    """What the project's own sampler gives with the TLCM LoRA alone, per step count."""
    state = trained_lora()[0]
    return {n: reference_latents(state, n, SEED) for n in STEPS}


def _tlcm(pipe, export_dir):
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TLCMScheduler.from_pretrained(export_dir, subfolder="scheduler")
    pipe.load_lora_weights(str(export_dir / "diffusers"), adapter_name="tlcm")
    return pipe


# ---------------------------------------------------------------------------------------------------- T2I-Adapter

def tiny_t2i_adapter(seed: int = 0):
    """A random SDXL T2I-Adapter for the tiny UNet. FullAdapterXL pixel-unshuffles the image by `downscale_factor`,
    then returns four features that the UNet adds after down block 0 (after its downsampler), inside down block 1
    (before its downsampler), inside down block 2 and after the mid block. The tiny UNet (block_out_channels 32, 64,
    96; 16x16 latents of 32x32 images) has there 32x8x8, 64x8x8, 96x4x4, 96x4x4: channels (32, 64, 96, 96) and
    downscale 4 (32 / 4 = 8; the adapter's one downsampling block halves to 4). SDXL's own: (320, 640, 1280, 1280),
    downscale 16 (1024 px -> 64, 64, 32, 32)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=[32, 64, 96, 96], num_res_blocks=1, downscale_factor=4,
                      adapter_type="full_adapter_xl").eval()


@pytest.fixture(scope="module")
def adapter_pipe(export_dir):
    from diffusers import StableDiffusionXLAdapterPipeline

    base = fresh_pipe()
    pipe = StableDiffusionXLAdapterPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, adapter=tiny_t2i_adapter(), scheduler=base.scheduler,
        force_zeros_for_empty_prompt=False)
    return _tlcm(pipe, export_dir)


def _cond_images(seed: int) -> list[Image.Image]:
    """A conditioning image per prompt (a sketch / depth map in real use), random here."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in PROMPTS]


def _features_consumed(pipe, **kw) -> list[tuple[int, int]]:
    """(features passed, features left unused) per UNet call. The UNet pops each adapter feature as it adds it, and
    skips the mid-block one silently when its shape does not fit: a left-over feature was never applied."""
    seen = []

    def pre(_module, _args, kwargs):
        res = kwargs.get("down_intrablock_additional_residuals")
        seen.append((len(res) if res is not None else 0, res))

    handle = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        pipeline_latents(pipe, 2, SEED, **kw)
    finally:
        handle.remove()
    return [(n, len(res) if res is not None else 0) for n, res in seen]


@pytest.mark.parametrize("steps", STEPS)
def test_t2i_adapter_pipeline(adapter_pipe, refs, steps):
    pipe, A, B = adapter_pipe, _cond_images(1), _cond_images(2)
    with_a = pipeline_latents(pipe, steps, SEED, image=A)
    assert with_a.shape == (2, 4, 16, 16) and torch.isfinite(with_a).all()
    # the conditioning image steers the sample: another image, another sample
    with_b = pipeline_latents(pipe, steps, SEED, image=B)
    assert torch.isfinite(with_b).all() and _differs(with_a, with_b, by=1.0)
    # adapter_conditioning_scale 0 is exactly the plain TLCM sampler (LoRA loaded right, alpha kept); 1 is not
    off = pipeline_latents(pipe, steps, SEED, image=A, adapter_conditioning_scale=0.0)
    torch.testing.assert_close(off, refs[steps], **EXACT)
    assert _differs(with_a, off, by=1.0)
    # the TLCM LoRA is active alongside the adapter
    pipe.disable_lora()
    try:
        no_lora = pipeline_latents(pipe, steps, SEED, image=A)
    finally:
        pipe.enable_lora()
    assert torch.isfinite(no_lora).all() and _differs(with_a, no_lora, by=1.0)


def test_t2i_adapter_features_all_used_and_images_decode(adapter_pipe):
    pipe = adapter_pipe
    # every UNet call gets the adapter's 4 features and uses all 4 (the shapes fit the tiny UNet)
    assert _features_consumed(pipe, image=_cond_images(1)) == [(4, 0), (4, 0)]
    images = [pipe(prompt=PROMPTS, image=_cond_images(k), num_inference_steps=2, guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(SEED)).images for k in (1, 2)]
    assert [im.size for im in images[0]] == [(32, 32), (32, 32)]
    assert images[0][0].tobytes() != images[1][0].tobytes()  # different conditioning, different pictures


# ---------------------------------------------------------------------------------------------------- style LoRA

def make_style_lora(out_dir, std: float = 0.1):
    """A style LoRA as diffusers' SDXL LoRA training script saves one: PEFT adapters on the UNet's attention and on
    the first text encoder, random non-zero lora_B, written by `save_lora_weights` (diffusers format, rank and alpha
    in the file's metadata). Returns the pipeline it was made on (adapters attached and active).

    The text encoder's adapter is injected with PEFT directly: the script's `text_encoder.add_adapter` (transformers
    5) wants peft >= 0.22, newer than this environment's. Loading such a LoRA (`load_lora_weights`) does not."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = fresh_pipe()
    cfgs = {"unet": LoraConfig(r=STYLE_RANK, lora_alpha=STYLE_ALPHA, target_modules=["to_q", "to_k", "to_v",
                                                                                        "to_out.0"]),
            "text_encoder": LoraConfig(r=STYLE_RANK, lora_alpha=STYLE_ALPHA,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])}
    pipe.unet.add_adapter(cfgs["unet"])
    inject_adapter_in_model(cfgs["text_encoder"], pipe.text_encoder)
    g = torch.Generator().manual_seed(9)
    layers = {}
    for name in cfgs:
        model = getattr(pipe, name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        layers[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionXLPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=cfgs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=cfgs["text_encoder"].to_dict())
    return pipe


@pytest.fixture(scope="module")
def style(tmp_path_factory, export_dir):
    """(the style LoRA's folder, the pipeline it was made on, a pipeline with TLCM + style loaded)."""
    out = tmp_path_factory.mktemp("style")
    author = make_style_lora(out)
    author.set_progress_bar_config(disable=True)
    author.scheduler = TLCMScheduler.from_pretrained(export_dir, subfolder="scheduler")
    pipe = _tlcm(fresh_pipe(), export_dir)
    pipe.load_lora_weights(str(out), adapter_name="style")
    return out, author, pipe


@pytest.mark.parametrize("steps", STEPS)
def test_stacked_with_a_style_lora(style, refs, steps):
    _, _, pipe = style
    try:
        pipe.set_adapters(["tlcm", "style"], adapter_weights=[1.0, 0.0])  # style at 0: the TLCM LoRA alone
        torch.testing.assert_close(pipeline_latents(pipe, steps, SEED), refs[steps], **EXACT)
        pipe.set_adapters(["tlcm", "style"], adapter_weights=[1.0, 1.0])
        stacked = pipeline_latents(pipe, steps, SEED)
        assert torch.isfinite(stacked).all() and _differs(stacked, refs[steps], by=0.1)
        pipe.set_adapters(["tlcm", "style"], adapter_weights=[1.0, 0.5])  # the weight is a dial
        half = pipeline_latents(pipe, steps, SEED)
        assert _differs(half, refs[steps], by=0.1) and _differs(half, stacked, by=0.1)
        # the TLCM LoRA is still doing the sampling under the stack: without it, the style LoRA alone is far off
        pipe.set_adapters(["tlcm", "style"], adapter_weights=[0.0, 1.0])
        assert _differs(pipeline_latents(pipe, steps, SEED), stacked, by=1.0)
    finally:
        pipe.set_adapters(["tlcm"])
    torch.testing.assert_close(pipeline_latents(pipe, steps, SEED), refs[steps], **EXACT)  # and it unstacks


def test_style_lora_loads_as_it_was_made(style):
    """diffusers loads the style LoRA next to the TLCM one as its author had it: rank 2, alpha 1 (scale 0.5),
    UNet and text encoder; alone it samples what the author's own pipeline samples."""
    _, author, pipe = style
    try:
        pipe.set_adapters(["style"])
        got = pipeline_latents(pipe, 2, SEED)
    finally:
        pipe.set_adapters(["tlcm"])
    torch.testing.assert_close(got, pipeline_latents(author, 2, SEED), rtol=1e-5, atol=1e-5)
    assert pipe.get_list_adapters() == {"unet": ["tlcm", "style"], "text_encoder": ["style"]}
    author.unet.disable_adapters()
    try:
        assert _differs(pipeline_latents(author, 2, SEED), got, by=0.1)  # the style LoRA has an effect of its own
    finally:
        author.unet.enable_adapters()


# ------------------------------------------------------------------------------- tlcm_pipeline(extra_loras=...)

def test_tlcm_pipeline_with_extra_loras(style, refs):
    """The library's sampling pipeline stacks the style LoRA at its weight and merges everything into the UNet:
    the same samples as diffusers' unmerged `set_adapters` stack, up to float rounding."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tlcm_core.generate import tlcm_pipeline

    folder, _, stacked_pipe = style
    state = trained_lora()[0]
    file = folder / "pytorch_lora_weights.safetensors"
    for ref, w in [(str(folder), 0.7), (file, 0.7)]:  # a folder or the file itself
        pipe = tlcm_pipeline(teacher(), state, LORA, device="cpu", extra_loras=[(ref, w)])
        pipe.set_progress_bar_config(disable=True)
        layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.merged for m in layers)
        assert {a for m in layers for a in m.merged_adapters} == {"tlcm", "extra_0"}
        try:
            stacked_pipe.set_adapters(["tlcm", "style"], adapter_weights=[1.0, w])
            want = pipeline_latents(stacked_pipe, 4, SEED)
        finally:
            stacked_pipe.set_adapters(["tlcm"])
        got = pipeline_latents(pipe, 4, SEED)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        assert _differs(got, refs[4], by=0.1)
    pipe = tlcm_pipeline(teacher(), state, LORA, device="cpu", extra_loras=[(file, 0.0)])
    torch.testing.assert_close(pipeline_latents(pipe, 4, SEED), refs[4], rtol=1e-4, atol=1e-3)
