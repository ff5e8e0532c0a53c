"""SD3 / SD3.5: an SD3Transformer2DModel (MMDiT) on a rectified-flow schedule (docs/flow-matching.md).

Called as StableDiffusion3Pipeline calls it: the latents as they are (the transformer patches them itself), the
timestep sigma * 1000 in float32, the joint text sequence (both CLIPs' hidden states side by side, padded to T5's
width, then T5's) and both CLIPs' pooled projections. Guidance is true CFG with an unconditional batch (the empty
prompt), combined on the velocity as the pipeline does. SD3.5 shifts its sigmas by a fixed 3.
"""

from __future__ import annotations

import torch

from ..conditioning import Conditioning
from ..flow_schedule import FlowSchedule
from .base import ConfigReader, ModelFamily, TeacherError

# StableDiffusion3Pipeline's default T5 length
MAX_SEQUENCE_LENGTH = 256

# No official TLCM SD3 LoRA exists. Attention and MLP of both streams of every joint block (image: to_q/k/v, to_out.0,
# ff; text: add_q/k/v_proj, to_add_out, ff_context; `attn2` of SD3.5's MMDiT-X blocks matches the same names):
# the SDXL release adapts attention and MLP of its transformer blocks, diffusers' SD3 LoRA scripts adapt these
# attention projections, and both streams carry the prompt. The adaLN modulations and embedders the FLUX release
# adds are left out: per block they are as large as the attention, and nothing published says SD3 needs them.
SD3_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


def _present(index: dict, part: str) -> bool:
    return bool(index.get(part)) and None not in index[part]


class SD3Family(ModelFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    network_part = "transformer"
    network_classes = ("SD3Transformer2DModel",)
    required_parts = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                      "tokenizer_2")
    text_encoder_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_target_modules = SD3_TARGET_MODULES

    def network_loader(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def latent_side_multiple(self, net_config) -> int:
        return net_config["patch_size"]

    def image_seq_len(self, resolution, vae_scale_factor, net_config) -> int:
        side = resolution // vae_scale_factor // net_config["patch_size"]
        return side * side

    def schedule(self, scheduler_config, image_seq_len=None) -> FlowSchedule:
        return FlowSchedule.from_config(scheduler_config, image_seq_len=image_seq_len)

    def forward(self, net, x_t, t, cond: Conditioning, schedule: FlowSchedule) -> torch.Tensor:
        timestep = schedule.model_timestep(t).float().to(x_t.device)  # scheduler.timesteps (float32), as it is
        return net(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                   pooled_projections=cond.pooled, return_dict=False)[0]

    def euler_grid(self, scheduler_config, steps, image_seq_len):
        """StableDiffusion3Pipeline's grid: the scheduler's own `set_timesteps(N)` (evenly spaced between its
        largest and smallest training sigma, then shifted); `mu` only under dynamic shifting, as the pipeline."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        c, kw = scheduler.config, {}
        if c.get("use_dynamic_shifting", None):
            kw["mu"] = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256),
                                       c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                       c.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, **kw)
        return scheduler.timesteps, scheduler.sigmas

    def discriminator_features(self, net, x_t, t, cond, schedule) -> torch.Tensor:
        """The image tokens after the first half of the joint blocks (SD3Transformer2DModel.forward up to block
        num_layers // 2, at least one), as a map (B, inner dim, h/p, w/p) over the patches. Every joint block has
        the same shape, so the first half is the counterpart of a UNet's encoder half; the text has been read (joint
        attention)."""
        b, _, h, w = x_t.shape
        p = net.config.patch_size
        timestep = schedule.model_timestep(t).float().to(x_t.device)
        hidden = net.pos_embed(x_t).contiguous()
        temb = net.time_text_embed(timestep, cond.pooled)
        text = net.context_embedder(cond.prompt_embeds)
        for block in net.transformer_blocks[:max(1, len(net.transformer_blocks) // 2)]:
            if torch.is_grad_enabled() and net.gradient_checkpointing:
                text, hidden = net._gradient_checkpointing_func(block, hidden, text, temb, None)
            else:
                text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
        return hidden.transpose(1, 2).reshape(b, hidden.shape[-1], h // p, w // p)

    def discriminator_channels(self, net_config) -> int:
        return net_config["num_attention_heads"] * net_config["attention_head_dim"]

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, resolution, batch_size=64, max_sequence_length=None):
        """StableDiffusion3Pipeline.encode_prompt with CFG: the joint sequence and the pooled projections of each
        prompt, and of the empty prompt as the unconditional."""
        device = self.network(pipe).device
        msl = max_sequence_length or MAX_SEQUENCE_LENGTH
        conds, uncond = [], None
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=device,
                                                          num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                          max_sequence_length=msl)
            conds.append(Conditioning(pe, pooled))
            uncond = Conditioning(npe[:1], npooled[:1])
        return Conditioning.cat(conds), uncond

    def tokenizer_limits(self, index, max_sequence_length=None):
        """Both CLIPs' hidden states enter the joint sequence (77 tokens each), and T5's (max_sequence_length)."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        out = [("tokenizer", CLIPTokenizer, None), ("tokenizer_2", CLIPTokenizer, None)]
        if _present(index, "tokenizer_3"):
            out.append(("tokenizer_3", T5TokenizerFast, max_sequence_length or MAX_SEQUENCE_LENGTH))
        return out

    def check_shapes(self, where: str, index: dict, config: ConfigReader) -> None:
        tr, vae, te, te2 = config("transformer"), config("vae"), config("text_encoder"), config("text_encoder_2")
        if tr.get("in_channels") != vae.get("latent_channels", 16):
            raise TeacherError(f"{where}: the transformer takes {tr.get('in_channels')} channels but the VAE makes "
                               f"{vae.get('latent_channels', 16)}")
        pooled = te.get("projection_dim", 0) + te2.get("projection_dim", 0)
        if tr.get("pooled_projection_dim") != pooled:
            raise TeacherError(f"{where}: transformer pooled_projection_dim={tr.get('pooled_projection_dim')} but the "
                               f"two CLIP encoders project to {te.get('projection_dim')} + {te2.get('projection_dim')}")
        t5 = config("text_encoder_3") if _present(index, "text_encoder_3") else None
        if t5 is not None and tr.get("joint_attention_dim") != t5.get("d_model"):
            raise TeacherError(f"{where}: transformer joint_attention_dim={tr.get('joint_attention_dim')} does not "
                               f"match the T5 encoder's d_model={t5.get('d_model')}")


SD3 = SD3Family()
