"""A tiny SD3-shaped flow-matching diffusers pipeline (random weights) for the toy worlds: the toy flow teacher.

Same classes and code path as SD3.5: `StableDiffusion3Pipeline` with two projecting CLIP text encoders (their
penultimate hidden states side by side, their pooled projections concatenated), a T5 encoder (its sequence after
CLIP's in the joint text stream), an `SD3Transformer2DModel` (MMDiT: joint attention over image and text tokens,
2x2 patches, RMS qk-norm as SD3.5) and `FlowMatchEulerDiscreteScheduler` with SD3's fixed shift 3.

The VAE is the world's UNet teacher's (same images, same latents: 4x16x16 for 32x32 pixels), with `shift_factor` 0
as SD3's pipeline needs one. The text encoders stay at their seeded random initialisation (frozen), as the UNet
teacher's. Text lengths are toy-sized: 16 CLIP tokens (a toy prompt is at most 10) and 16 T5 tokens
(`MAX_SEQUENCE_LENGTH`: pass it to the pipeline, as `teacher.max_sequence_length` does), so the joint sequence is
32 text + 64 image tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from .pipeline import _widen_embeddings
from .tokenizer import TOY_WORDS, build_tokenizer

__all__ = ["build_toy_flow_pipeline", "transformer_config", "MAX_SEQUENCE_LENGTH", "CLIP_LENGTH", "SD3_SCHEDULER",
           "t5_tokenizer"]

CLIP_LENGTH = 16  # CLIP tokens per prompt (the tokenizers' model_max_length)
MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt
CLIP_DIM = 32  # hidden size of each CLIP; both side by side (64) = the T5 width = the transformer's joint dim
PROJ_DIM = 32  # each CLIP's pooled projection; the transformer's pooled input is both (64)
T5_DIM = 2 * CLIP_DIM
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's scheduler config


def transformer_config(width: int = 128, layers: int = 6, head_dim: int = 32) -> dict:
    return dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=T5_DIM,
                caption_projection_dim=width, pooled_projection_dim=2 * PROJ_DIM, pos_embed_max_size=8,
                qk_norm="rms_norm")


def t5_tokenizer() -> T5TokenizerFast:
    """A unigram T5 tokenizer from an in-memory vocabulary: the toy words whole, letters as a fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in TOY_WORDS] + [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, unk_id=2, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def _clip(seed: int) -> CLIPTextModelWithProjection:
    tok = build_tokenizer(CLIP_LENGTH)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=CLIP_DIM, intermediate_size=4 * CLIP_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, hidden_act="gelu", projection_dim=PROJ_DIM,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    _widen_embeddings(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _t5(seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM,
                                    num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    with torch.no_grad():  # unit-std token embeddings: distinct outputs per prompt from a frozen random encoder
        model.shared.weight.copy_(torch.randn(model.shared.weight.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def build_toy_flow_pipeline(vae_from: str | Path, seed: int = 0, **transformer_kw) -> StableDiffusion3Pipeline:
    """Assemble the toy SD3 pipeline: random transformer and text encoders (deterministic in `seed`), the VAE of the
    diffusers folder `vae_from` (the world's UNet teacher) with `shift_factor` 0."""
    vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae")
    vae.register_to_config(shift_factor=0.0)
    torch.manual_seed(seed * 10 + 1)
    transformer = SD3Transformer2DModel(**transformer_config(**transformer_kw))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae.eval(),
        text_encoder=_clip(seed * 10 + 2),
        tokenizer=build_tokenizer(CLIP_LENGTH),
        text_encoder_2=_clip(seed * 10 + 4),
        tokenizer_2=build_tokenizer(CLIP_LENGTH),
        text_encoder_3=_t5(seed * 10 + 6),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
