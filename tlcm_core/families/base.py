"""What a model family is: everything the stages must not know about one kind of teacher network.

A family says which diffusers pipeline classes it covers and which component is the denoising network (the one the
student's LoRA adapts), how that network is called on `(x_t, t, cond)` (timestep scaling, packing, position ids),
how guidance is applied, how prompts become a `Conditioning`, how big its latents are, which noise schedule it runs
on, and the LoRA target modules its official TLCM release uses. The math above it (schedules, samplers, losses)
sees only `(a_t, s_t)` and `(x0, eps)`; latents are always `(B, C, h, w)` outside the family.

A family object holds no weights and no per-run state: one instance per family, shared.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..conditioning import Conditioning
from ..errors import UserError
from ..schedule import cfg


class TeacherError(UserError, ValueError):
    """The teacher cannot be used (not found, wrong kind, missing parts)."""


ConfigReader = Callable[[str], dict]  # component subfolder -> its config.json, read from the teacher's files


class ModelFamily:
    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # the diffusers pipelines (model_index.json's _class_name) it covers
    network_part: str = "unet"  # the pipeline component that denoises
    network_classes: tuple[str, ...] = ()  # its diffusers class names
    required_parts: tuple[str, ...] = ()  # components model_index.json must name
    text_encoder_parts: tuple[str, ...] = ()  # frozen with the network after loading
    lora_target_modules: tuple[str, ...] = ()  # the default LoRA targets (module-name suffixes, PEFT style)

    # -- the network -------------------------------------------------------------------------------------------------

    def network(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.network_part)

    def network_loader(self):
        """The diffusers class that loads the network alone from `<source>/<network_part>`."""
        raise NotImplementedError

    def latent_channels(self, net_config) -> int:
        """Channels of the latents the stages see, (B, C, h, w), from the network's config."""
        return net_config["in_channels"]

    def latent_side_multiple(self, net_config) -> int:
        """The latent side must be a multiple of this (FLUX packs 2x2, SD3 patches patch_size x patch_size)."""
        return 1

    def image_seq_len(self, resolution: int, vae_scale_factor: int, net_config) -> int | None:
        """Image tokens the network sees at `resolution` (a flow schedule's dynamic shift); None when irrelevant."""
        return None

    def schedule(self, scheduler_config: dict, image_seq_len: int | None = None):
        """The teacher's noise schedule (NoiseSchedule or FlowSchedule) from its scheduler config."""
        raise NotImplementedError

    def forward(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, schedule) -> torch.Tensor:
        """The network's raw output (eps, v or velocity) for latents `x_t` (B, C, h, w) at integer timesteps `t` (B,),
        called the way the family's stock pipeline calls it; same layout as `x_t`."""
        raise NotImplementedError

    def guided_output(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                      w: float, schedule) -> torch.Tensor:
        """The guided raw output. Default: classifier-free guidance (TLCM eq. 8) on the raw output, unconditional
        and conditional in one batched forward pass. CFG is linear and so is every output -> (x0, eps) conversion
        (eps, v, x0, velocity), so guiding the raw output equals guiding eps."""
        n = x_t.shape[0]
        if len(uncond) == 1 and n > 1:
            uncond = uncond.expand(n)
        out = self.forward(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]), schedule)
        out = out.to(x_t.dtype)
        return cfg(out[:n], out[n:], w)

    def sampler_output(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                       w: float, schedule) -> torch.Tensor:
        """The raw output the family's stock pipeline steps with at guidance scale `w`: guided only when w > 1 (the
        pipelines' `do_classifier_free_guidance`), else the conditional output of one forward pass."""
        if w > 1:
            return self.guided_output(net, x_t, t, cond, uncond, w, schedule)
        return self.forward(net, x_t, t, cond, schedule).to(x_t.dtype)

    def euler_grid(self, scheduler_config: dict, steps: int, image_seq_len: int | None):
        """A flow teacher's own sampling grid at `steps` steps: `(timesteps, sigmas)` of the stock pipeline's
        FlowMatchEulerDiscreteScheduler after its `set_timesteps` (float32; sigmas end with the terminal 0). None for
        a DDPM-time family, whose baseline is DDIM on trailing integer timesteps (samplers.teacher_sample)."""
        return None

    def enable_gradient_checkpointing(self, net) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (compute.gradient_
        checkpointing): diffusers' own switch, which every supported network has, with a checkpoint function that
        recomputes a block with its LoRA adapters as they were in the forward pass (`adapter_faithful_checkpoint`)."""
        net.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_faithful_checkpoint)

    # -- the discriminator of stage 3 --------------------------------------------------------------------------------

    def discriminator_features(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                               schedule) -> torch.Tensor:
        """Features of the network for the GAN's discriminator (TLCM eq. 13), a map (B, C, h', w') over the latent
        grid: the first part of the network's own forward pass, called as `forward` calls it."""
        raise NotImplementedError

    def discriminator_channels(self, net_config) -> int:
        """C of `discriminator_features`."""
        raise NotImplementedError

    # -- text --------------------------------------------------------------------------------------------------------

    def encode_prompts(self, pipe, prompts: list[str], resolution: int, batch_size: int = 64,
                       max_sequence_length: int | None = None) -> tuple[Conditioning, Conditioning]:
        """Each prompt's conditioning and the unconditional (a batch of one), as the stock pipeline encodes them."""
        raise NotImplementedError

    def tokenizer_limits(self, index: dict,
                         max_sequence_length: int | None = None) -> list[tuple[str, type, int | None]]:
        """(tokenizer subfolder, its class, token limit) for the prompt-length check before the teacher loads, one
        per tokenizer whose sequence the network reads; limit None: the tokenizer's own model_max_length."""
        from transformers import CLIPTokenizer

        return [("tokenizer", CLIPTokenizer, None)]

    # -- checks before any weights load ------------------------------------------------------------------------------

    def check_parts(self, where: str, index: dict) -> None:
        for part in self.required_parts:
            if part not in index:
                raise TeacherError(f"{where}: the pipeline has no {part}")

    def check_shapes(self, where: str, index: dict, config: ConfigReader) -> None:
        """The components' configs fit together (read from the small config files only)."""


# ---------------------------------------------------------------------------------------------------------------------
# The VAE, the same for every family: its own config holds the latents' scale and shift


def vae_scale_shift(vae_config) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor): latents the network sees are `(z - shift) * scale` of the VAE's z. SD/SDXL
    VAEs have no shift (None); FLUX's and SD3's have one."""
    get = vae_config.get if isinstance(vae_config, dict) else lambda k, d=None: getattr(vae_config, k, d)
    return get("scaling_factor", 0.18215), get("shift_factor", None)


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent side: 2 ** (number of VAE blocks - 1), as every diffusers pipeline computes it."""
    get = vae_config.get if isinstance(vae_config, dict) else lambda k, d=None: getattr(vae_config, k, d)
    return 2 ** (len(get("block_out_channels")) - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing with LoRA adapters that are switched between the forward and the backward pass


def _adapter_state(layers: list) -> list[tuple]:
    return [(m._disable_adapters, m._active_adapter) for m in layers]


def _set_adapter_state(layers: list, state: list[tuple]) -> None:
    for m, (disabled, active) in zip(layers, state):
        m._disable_adapters, m._active_adapter = disabled, active


def adapter_faithful_checkpoint(module, *args):
    """torch's non-reentrant checkpoint of `module(*args)` (what diffusers uses by default), except that the
    recomputation in the backward pass sees the LoRA adapters of `module` as the forward pass saw them.

    Stage 3 keeps teacher, student and fake score model in one network and switches adapters around calls (the
    discriminator and the teacher are the network with every adapter off), while the backward pass of the student's
    loss runs after the switch is undone: a plain checkpoint would recompute the discriminator's blocks with the
    student's adapter on, and the student would get the gradient of another network. Only the adapters' switches
    (PEFT's per-layer `_disable_adapters` and `_active_adapter`) are restored for the recomputation; which
    parameters are trainable is untouched."""
    import torch.utils.checkpoint

    layers = [m for m in module.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "_active_adapter")]
    forward_state = _adapter_state(layers)

    def run(*inputs):
        now = _adapter_state(layers)
        _set_adapter_state(layers, forward_state)
        try:
            return module(*inputs)
        finally:
            _set_adapter_state(layers, now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
