"""FLUX.1 (dev, schnell): a FluxTransformer2DModel on a rectified-flow schedule (docs/flow-matching.md).

Called as FluxPipeline calls it: the latents (B, C, h, w) are packed 2x2 into h/2 * w/2 tokens of 4C channels with
position ids (0, row, column); the timestep is sigma (the pipeline's `timestep / 1000`, cast to the latents' dtype
first); the text is the T5 sequence with all-zero position ids and CLIP's pooled embedding. FLUX.1-dev was distilled
from CFG into a guidance embedding, so its guidance is one forward pass with the guidance value, no unconditional
batch; a transformer without the embedding (schnell) gets true CFG with an unconditional batch, as FluxPipeline's
`true_cfg_scale`. The schedule's shift grows with the image token count (FlowSchedule, `use_dynamic_shifting`).
"""

from __future__ import annotations

import torch

from ..conditioning import Conditioning
from ..flow_schedule import FlowSchedule
from .base import ConfigReader, ModelFamily, TeacherError

# FluxPipeline's default T5 length
MAX_SEQUENCE_LENGTH = 512
# The embedded guidance of an unguided call (`denoiser(x_t, t, cond)`, the student): 1, as CFG with w = 1 is the
# conditional model itself, so `teacher_x0_fn(w=1)` and `guided(w=1)` agree.
UNGUIDED = 1.0

# The official TLCM FLUX.1-dev LoRA (github.com/OPPO-Mente-Lab/TLCM, README: rank 64, PEFT's default alpha): the
# SDXL release's attention and MLP names, plus the text stream's attention and MLP of the double blocks
# (add_*_proj, to_add_out, ff_context), the single blocks' MLP input (proj_mlp), every adaLN modulation (`linear`),
# the timestep/guidance/pooled-text embedders (linear_1, linear_2) and both input embedders. `proj_in` matches
# nothing in FLUX; it is in the release's list and stays harmless here.
FLUX_TARGET_MODULES = (
    "to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "context_embedder", "x_embedder", "linear", "linear_1", "linear_2", "proj_mlp",
    "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline._pack_latents (channels, then the 2x2 offsets)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack_latents: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """Position ids (0, row, column) of the h2 x w2 packed tokens: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    network_part = "transformer"
    network_classes = ("FluxTransformer2DModel",)
    required_parts = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                      "tokenizer_2")
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    lora_target_modules = FLUX_TARGET_MODULES

    def network_loader(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def latent_channels(self, net_config) -> int:
        return net_config["in_channels"] // 4  # the transformer sees 2x2-packed latents

    def latent_side_multiple(self, net_config) -> int:
        return 2

    def image_seq_len(self, resolution, vae_scale_factor, net_config) -> int:
        side = resolution // (vae_scale_factor * 2)  # FluxPipeline.prepare_latents, then the packing
        return side * side

    def schedule(self, scheduler_config, image_seq_len=None) -> FlowSchedule:
        return FlowSchedule.from_config(scheduler_config, image_seq_len=image_seq_len)

    def call_kwargs(self, net, x_t, t, cond: Conditioning, schedule) -> dict:
        """The transformer's keyword arguments for latents x_t (B, C, h, w) at timesteps t, as FluxPipeline builds
        them (`schedule`: a FlowSchedule, or a SigmaGrid whose `model_timestep` gives a stock grid's timesteps)."""
        b, _, h, w = x_t.shape
        timestep = schedule.model_timestep(t).float().to(x_t.device).to(x_t.dtype)  # scheduler.timesteps, as cast
        guidance = None
        if net.config.guidance_embeds:
            guidance = cond.guidance if cond.guidance is not None else torch.full((b,), UNGUIDED)
            guidance = guidance.to(x_t.device, torch.float32)
        return dict(hidden_states=pack_latents(x_t), timestep=timestep / 1000, guidance=guidance,
                    pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                    txt_ids=cond.text_ids[0], img_ids=image_ids(h // 2, w // 2, x_t.device, cond.prompt_embeds.dtype))

    def forward(self, net, x_t, t, cond: Conditioning, schedule: FlowSchedule) -> torch.Tensor:
        out = net(**self.call_kwargs(net, x_t, t, cond, schedule), return_dict=False)[0]
        return unpack_latents(out, *x_t.shape[2:])

    def guided_output(self, net, x_t, t, cond, uncond, w, schedule) -> torch.Tensor:
        """FLUX.1-dev: the guidance embedding set to w, one forward pass; without the embedding, true CFG."""
        if not net.config.guidance_embeds:
            return super().guided_output(net, x_t, t, cond, uncond, w, schedule)
        g = torch.full((x_t.shape[0],), float(w), dtype=torch.float32)
        return self.forward(net, x_t, t, cond.replace(guidance=g), schedule).to(x_t.dtype)

    def sampler_output(self, net, x_t, t, cond, uncond, w, schedule) -> torch.Tensor:
        """FluxPipeline embeds its guidance_scale whatever it is (FLUX.1-dev); without the embedding it runs the
        conditional pass alone (true CFG needs a negative prompt and true_cfg_scale, which it does not set)."""
        if net.config.guidance_embeds:
            return self.guided_output(net, x_t, t, cond, uncond, w, schedule)
        return self.forward(net, x_t, t, cond, schedule).to(x_t.dtype)

    def euler_grid(self, scheduler_config, steps, image_seq_len):
        """FluxPipeline's grid: sigmas linspace(1, 1/N, N), shifted by the mu of the image token count."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        c = scheduler.config
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.timesteps, scheduler.sigmas

    def discriminator_features(self, net, x_t, t, cond, schedule) -> torch.Tensor:
        """The image stream after the double-stream blocks: FluxTransformer2DModel.forward up to its single-stream
        blocks, as a map (B, inner dim, h/2, w/2) over the packed 2x2 patches. Why there: the text has been read
        (joint attention in every double block), the image tokens are still a stream of their own, one per latent
        patch, and the 19 double blocks hold about half the weights (a third of the compute) of FLUX.1, as the
        encoder half of a UNet does."""
        b, _, h, w = x_t.shape
        kw = self.call_kwargs(net, x_t, t, cond, schedule)
        hidden = net.x_embedder(kw["hidden_states"])
        timestep = kw["timestep"].to(hidden.dtype) * 1000
        guidance = kw["guidance"]
        temb = net.time_text_embed(timestep, kw["pooled_projections"]) if guidance is None else \
            net.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, kw["pooled_projections"])
        text = net.context_embedder(kw["encoder_hidden_states"])
        rotary = net.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
        for block in net.transformer_blocks:
            if torch.is_grad_enabled() and net.gradient_checkpointing:
                text, hidden = net._gradient_checkpointing_func(block, hidden, text, temb, rotary, None)
            else:
                text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                     image_rotary_emb=rotary)
        return hidden.transpose(1, 2).reshape(b, hidden.shape[-1], h // 2, w // 2)

    def discriminator_channels(self, net_config) -> int:
        return net_config["num_attention_heads"] * net_config["attention_head_dim"]

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, resolution, batch_size=64, max_sequence_length=None):
        """The T5 sequence, CLIP's pooled embedding and the text position ids, per prompt (FluxPipeline.encode_prompt);
        the unconditional is the empty prompt (used only by true CFG)."""
        device = self.network(pipe).device
        msl = max_sequence_length or MAX_SEQUENCE_LENGTH

        def encode(chunk: list[str]) -> Conditioning:
            pe, pooled, text_ids = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device,
                                                      num_images_per_prompt=1, max_sequence_length=msl)
            return Conditioning(pe, pooled, text_ids=text_ids.unsqueeze(0).repeat(len(chunk), 1, 1))

        conds = [encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return Conditioning.cat(conds), encode([""])

    def tokenizer_limits(self, index, max_sequence_length=None):
        """The T5 sequence is what the transformer reads; CLIP gives only the pooled summary and FluxPipeline cuts it
        at 77 tokens by design, so only T5 is checked."""
        from transformers import T5TokenizerFast

        return [("tokenizer_2", T5TokenizerFast, max_sequence_length or MAX_SEQUENCE_LENGTH)]

    def check_shapes(self, where: str, index: dict, config: ConfigReader) -> None:
        tr, vae, te, t5 = config("transformer"), config("vae"), config("text_encoder"), config("text_encoder_2")
        if tr.get("in_channels") != 4 * vae.get("latent_channels", 16):
            raise TeacherError(f"{where}: the transformer takes {tr.get('in_channels')} channels but the VAE's "
                               f"{vae.get('latent_channels', 16)} latent channels pack 2x2 into "
                               f"{4 * vae.get('latent_channels', 16)}")
        if tr.get("joint_attention_dim") != t5.get("d_model"):
            raise TeacherError(f"{where}: transformer joint_attention_dim={tr.get('joint_attention_dim')} does not "
                               f"match the T5 encoder's d_model={t5.get('d_model')}")
        if tr.get("pooled_projection_dim") != te.get("hidden_size"):
            raise TeacherError(f"{where}: transformer pooled_projection_dim={tr.get('pooled_projection_dim')} does "
                               f"not match the CLIP encoder's hidden_size={te.get('hidden_size')}")


FLUX = FluxFamily()
