"""A tiny SDXL-shaped diffusers pipeline (random weights) for the toy worlds.

Same classes and code path as SDXL: two CLIP text encoders (the second with projection, its pooled
output conditions ``text_time``), an ``AutoencoderKL``, a ``UNet2DConditionModel`` with
``addition_embed_type="text_time"``, cross-attention on the concatenated penultimate hidden states,
and the SDXL noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon) in an
EulerDiscreteScheduler config like SDXL ships.

Sizes: 32x32 RGB images <-> 4x16x16 latents (VAE with two blocks, ``vae_scale_factor`` 2).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import MODEL_MAX_LENGTH, build_tokenizer

__all__ = [
    "build_toy_pipeline",
    "SDXL_SCHEDULE",
    "TEXT_DIM",
    "POOLED_DIM",
    "unet_config",
    "vae_config",
    "scheduler_config",
    "TOY_TIME_IDS",
]

IMAGE_SIZE = 32
TEXT_DIM = 32  # hidden size of each text encoder; cross-attention dim = 2 * TEXT_DIM
POOLED_DIM = 32  # projection dim of text encoder 2 (pooled conditioning)
ADD_TIME_DIM = 8
# SDXL micro-conditioning at the toy size: original (32, 32), crop (0, 0), target (32, 32)
TOY_TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)

SDXL_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def scheduler_config() -> dict:
    """The EulerDiscreteScheduler config SDXL base 1.0 ships (with the SDXL schedule)."""
    return dict(
        **SDXL_SCHEDULE,
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        trained_betas=None,
        use_karras_sigmas=False,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from the trained latents' std (teacher training)
        force_upcast=False,
        mid_block_add_attention=True,
    )


def unet_config() -> dict:
    return dict(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads (as in SDXL's config)
        cross_attention_dim=2 * TEXT_DIM,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * ADD_TIME_DIM,
        upcast_attention=False,
    )


def _text_config(**kw) -> CLIPTextConfig:
    tok = build_tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def _widen_embeddings(model: torch.nn.Module, g: torch.Generator) -> None:
    # CLIP's default init (std 0.02) makes random embeddings nearly identical in scale terms; unit-std
    # token/position embeddings give frozen random encoders clearly distinct outputs per prompt.
    emb = getattr(model, "text_model", model).embeddings  # transformers 4 nests, 5 flattens
    with torch.no_grad():
        emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=g))
        emb.position_embedding.weight.copy_(0.5 * torch.randn(emb.position_embedding.weight.shape, generator=g))


def build_toy_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Assemble the toy SDXL pipeline with random weights (deterministic in ``seed``)."""
    # each component from its own seed, so changing one never changes the others' init
    torch.manual_seed(seed * 10 + 1)
    vae = AutoencoderKL(**vae_config())
    torch.manual_seed(seed * 10 + 2)
    unet = UNet2DConditionModel(**unet_config())
    torch.manual_seed(seed * 10 + 3)
    text_encoder = CLIPTextModel(_text_config())
    _widen_embeddings(text_encoder, torch.Generator().manual_seed(seed * 10 + 4))
    torch.manual_seed(seed * 10 + 5)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=POOLED_DIM))
    _widen_embeddings(text_encoder_2, torch.Generator().manual_seed(seed * 10 + 6))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**scheduler_config()),
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    for m in (text_encoder, text_encoder_2, vae, unet):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
