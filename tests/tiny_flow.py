"""Tiny random-weight FLUX.1-dev- and SD3.5-shaped diffusers pipelines, built offline in memory (no hub, no files).

Same classes and code paths as the real models: FluxPipeline with a CLIP text encoder (pooled), a T5 encoder, a
FluxTransformer2DModel with the guidance embedding (FLUX.1-dev) and 2x2 latent packing; StableDiffusion3Pipeline with
two projecting CLIP encoders, a T5 encoder and an SD3Transformer2DModel (patch 2, RMS qk-norm as SD3.5). Each keeps its
base model's scheduler config: FLUX.1-dev's resolution-dependent shift, SD3.5's fixed shift 3.

Sizes: 32x32 images; the VAE has two blocks (scale factor 2), so FLUX latents are 4x16x16 packed to 64 tokens of 16
channels and SD3 latents 4x16x16 in 8x8 patches. Text: 16 tokens of T5 (pass MAX_SEQ to the pipelines).
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from tlcm_core.toy.tokenizer import TOY_WORDS, build_tokenizer

RES = 32
MAX_SEQ = 16  # T5 tokens per prompt (the pipelines pad to max_sequence_length)
PROMPTS = ["a red circle", "a blue square"]

# The scheduler configs the base models ship (FLUX.1-dev, SD3.5 large), as FlowMatchEulerDiscreteScheduler kwargs
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def t5_tokenizer() -> T5TokenizerFast:
    """A unigram T5 tokenizer from an in-memory vocabulary: the toy words whole, letters as a fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in TOY_WORDS] + [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, unk_id=2, extra_ids=0)


def _clip(cls, dim: int, seed: int, **kw):
    tok = build_tokenizer()
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)).eval()


def _t5(d_model: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=1, num_heads=2, relative_attention_num_buckets=8)).eval()


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=RES, scaling_factor=1.0,
                         shift_factor=0.0).eval()


def tiny_flux(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev-shaped: transformer in_channels 16 = 4 latent channels x 2x2 packing; guidance embedding on."""
    torch.manual_seed(seed * 10 + 1)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=_vae(seed * 10 + 2),
        text_encoder=_clip(CLIPTextModel, 32, seed * 10 + 3),
        tokenizer=build_tokenizer(),
        text_encoder_2=_t5(32, seed * 10 + 4),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5-shaped: pooled projection = both CLIP projections (2 x 16); joint attention dim = T5 width (32), which
    must hold the two CLIP hidden states side by side (2 x 16) as the pipeline pads them to it."""
    torch.manual_seed(seed * 10 + 1)
    transformer = SD3Transformer2DModel(sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                                        pos_embed_max_size=16, qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        vae=_vae(seed * 10 + 2),
        text_encoder=_clip(CLIPTextModelWithProjection, 16, seed * 10 + 3, projection_dim=16),
        tokenizer=build_tokenizer(),
        text_encoder_2=_clip(CLIPTextModelWithProjection, 16, seed * 10 + 4, projection_dim=16),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=_t5(32, seed * 10 + 5),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
