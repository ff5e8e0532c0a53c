"""SD 1.x/2.x and SDXL: a UNet2DConditionModel on a DDPM-time noise schedule (docs/method.md).

The UNet takes the integer timestep as it is; SDXL adds the pooled text embedding and the six size/crop ids
(`added_cond_kwargs`). Guidance is classifier-free, with an unconditional batch.
"""

from __future__ import annotations

import torch

from ..conditioning import Conditioning
from ..config import OFFICIAL_TARGET_MODULES
from ..schedule import NoiseSchedule
from .base import ConfigReader, ModelFamily, TeacherError


def sdxl_time_ids(resolution: int, n: int) -> torch.Tensor:
    """SDXL micro-conditioning: (original_size, crop_top_left, target_size) = (r, r, 0, 0, r, r)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(n, 1)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def unet_encoder(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The first half of UNet2DConditionModel.forward: embeddings, conv_in, down blocks, mid block."""
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ValueError("UNets with an encoder_hid_proj are not supported as discriminator encoders")
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
    kw = cond.unet_kwargs()
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.prompt_embeds,
                             added_cond_kwargs=kw.get("added_cond_kwargs", {}))
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond.prompt_embeds)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    return unet.mid_block(h, emb, encoder_hidden_states=cond.prompt_embeds)


class UNetFamily(ModelFamily):
    name = "unet"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")
    network_part = "unet"
    network_classes = ("UNet2DConditionModel",)
    required_parts = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    lora_target_modules = tuple(OFFICIAL_TARGET_MODULES)  # the official TLCM SDXL release (docs/method.md)

    def network_loader(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def schedule(self, scheduler_config: dict, image_seq_len: int | None = None) -> NoiseSchedule:
        return NoiseSchedule.from_config(scheduler_config)

    def forward(self, net, x_t, t, cond: Conditioning, schedule) -> torch.Tensor:
        return net(x_t, t, **cond.unet_kwargs(), return_dict=False)[0]

    def discriminator_features(self, net, x_t, t, cond, schedule) -> torch.Tensor:
        """The UNet's encoder half: embeddings, conv_in, down blocks, mid block (unet_encoder)."""
        return unet_encoder(net, x_t, t, cond)

    def discriminator_channels(self, net_config) -> int:
        return net_config["block_out_channels"][-1]

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, resolution, batch_size=64, max_sequence_length=None):
        """SDXL: both encoders, the pooled embedding, zeros for the empty prompt when force_zeros_for_empty_prompt."""
        device = pipe.unet.device
        conds, uncond = [], None
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            if is_sdxl(pipe):
                pe, npe, pooled, npooled = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=True)
                conds.append(Conditioning(pe, pooled, sdxl_time_ids(resolution, len(chunk)).to(device, pe.dtype)))
                uncond = Conditioning(npe[:1], npooled[:1], sdxl_time_ids(resolution, 1).to(device, pe.dtype))
            else:
                pe, npe = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=True)
                conds.append(Conditioning(pe))
                uncond = Conditioning(npe[:1])
        return Conditioning.cat(conds), uncond

    def tokenizer_limits(self, index, max_sequence_length=None):
        from transformers import CLIPTokenizer

        two = index.get("tokenizer_2") and None not in index["tokenizer_2"]
        return [("tokenizer", CLIPTokenizer, None)] + ([("tokenizer_2", CLIPTokenizer, None)] if two else [])

    def check_shapes(self, where: str, index: dict, config: ConfigReader) -> None:
        """SDXL-shaped (two text encoders, text_time conditioning) or SD 1.x/2.x."""
        unet, vae, te = config("unet"), config("vae"), config("text_encoder")
        if unet.get("in_channels") != vae.get("latent_channels", 4):
            raise TeacherError(f"{where}: the UNet takes {unet.get('in_channels')} channels but the VAE makes "
                               f"{vae.get('latent_channels', 4)}")
        xattn = unet.get("cross_attention_dim")
        xattn = set(xattn) if isinstance(xattn, list) else {xattn}
        if index.get("_class_name") == "StableDiffusionXLPipeline":
            _check_sdxl(where, index, unet, te, xattn, config)
        elif xattn != {te.get("hidden_size")}:
            raise TeacherError(f"{where}: UNet cross_attention_dim={unet.get('cross_attention_dim')} does not match "
                               f"the text encoder's hidden_size={te.get('hidden_size')}")


def _check_sdxl(where: str, index: dict, unet: dict, te: dict, xattn: set, config: ConfigReader) -> None:
    if not index.get("text_encoder_2") or not index.get("tokenizer_2") or None in index["text_encoder_2"]:
        raise TeacherError(f"{where} is not SDXL-shaped: it has no second text encoder/tokenizer")
    if unet.get("addition_embed_type") != "text_time":
        raise TeacherError(f"{where} is not SDXL-shaped: its UNet has addition_embed_type="
                           f"{unet.get('addition_embed_type')!r}, SDXL needs 'text_time' (pooled text + size ids)")
    te2 = config("text_encoder_2")
    want = te.get("hidden_size", 0) + te2.get("hidden_size", 0)
    if xattn != {want}:
        raise TeacherError(f"{where} is not SDXL-shaped: UNet cross_attention_dim={unet.get('cross_attention_dim')}"
                           f" but the two text encoders give {te.get('hidden_size')} + {te2.get('hidden_size')}")
    pooled = te2.get("projection_dim", te2.get("hidden_size", 0))
    want = pooled + 6 * (unet.get("addition_time_embed_dim") or 0)
    if unet.get("projection_class_embeddings_input_dim") != want:
        raise TeacherError(f"{where} is not SDXL-shaped: UNet projection_class_embeddings_input_dim="
                           f"{unet.get('projection_class_embeddings_input_dim')}, expected pooled {pooled} + 6 x "
                           f"addition_time_embed_dim {unet.get('addition_time_embed_dim')} = {want}")


UNET = UNetFamily()
