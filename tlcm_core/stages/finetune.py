"""Stage `finetune`: the bag of techniques of TLCM section 4.3, all data-free, on the one student LoRA.

Per step (batch of prompts, noise from a per-step seed):
  z0  = the student's q-step sample (Algorithm 2), no grad;  z_t = eq. 9 at a milestone t;  x0 = f(z_t, t, c)
  reward (eq. 11):  max(margin - s(dec(x0), c), 0) + max(s(dec(x0), c_neg), 0), through the scorer and VAE
  DMD (eq. 12):     0.5 || x0 - sg(x0 - (x0_fake - x0_real) / w) ||^2 at a re-noised t' (Yin et al. 2024)
  GAN (eq. 13):     non-saturating or hinge loss of a discriminator = frozen teacher encoder + trainable heads
then the fake score model (its own LoRA on the same UNet) takes denoising steps on the student's samples,
and the discriminator heads take a step on real vs fake.

Memory: teacher, student, fake score model and discriminator are ONE UNet: the student and the fake score
model are two LoRA adapters on it, and the teacher / discriminator encoder are the same weights with the
adapters switched off. Only LoRAs, the heads and their optimizer states add to one frozen UNet.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LoRAConfig, PipelineConfig, toy_world
from ..consistency import adapter_weights, stage_device, write_trained_lora
from ..lora import ADAPTER, active_adapter, adapters_disabled, attach_lora, load_lora_into, read_lora
from ..models import (Conditioning, Denoiser, decode_latents_grad, encode_prompts, load_pipeline, schedule_of,
                      teacher_identity, vae_scale_factor_of)
from ..prompts import load_prompts
from ..rewards import build_scorer, negative_prompts, reward_hinge
from ..samplers import ddim_sample, student_clean_latents, teacher_x0_fn
from ..schedule import ddim_timesteps, milestones
from ..stage import Stage, StageContext
from ..training import CheckpointIO, TrainState, make_optimizer, train
from .common import TRAINER_READS, final_lora_stage

FAKE = "fake"


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator: the teacher UNet's encoder (frozen) + small trainable heads


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


class DiscriminatorHeads(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.GroupNorm(1, channels), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))


def discriminate(unet, heads: DiscriminatorHeads, x, t, cond) -> torch.Tensor:
    """Logits (B,) of real vs fake for noised latents; the encoder runs with every adapter off (the teacher)."""
    with adapters_disabled(unet):
        return heads(unet_encoder(unet, x, t, cond))


def gan_generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    return F.softplus(-logits_fake).mean() if kind == "non-saturating" else -logits_fake.mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "non-saturating":
        return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Distribution matching


def dmd_gradient(model: Denoiser, unet, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond, uncond,
                 w: float) -> torch.Tensor:
    """DMD's gradient (Yin et al. 2024; TLCM eq. 12) at x0: (x0_fake - x0_real) / mean|x0 - x0_real|, with the
    real score from the teacher with CFG and the fake one from the fake score model, at x0 re-noised to t."""
    with torch.no_grad():
        x_t = model.schedule.add_noise(x0.detach(), noise, t)
        with adapters_disabled(unet):
            x0_real, _ = model.guided(x_t, t, cond, uncond, w)
        with active_adapter(unet, FAKE):
            x0_fake, _ = model(x_t, t, cond)
        weight = (x0.detach() - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-6)
        return (x0_fake - x0_real) / weight


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. x0 is `grad / x0.numel()` (a mean over batch and latent elements, as DMD2's
    reference code reduces it): `dmd_weight` then means the same at 32 px and at 1024 px, where a sum over the
    65k latent elements of a 1024-px SDXL latent would outweigh every other term by the resolution alone."""
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float(), reduction="mean")


def fake_score_backward(model: Denoiser, unet, x0: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
    """The fake score model's denoising loss on the student's (detached) samples (eps-MSE at a random t),
    back-propagated while its adapter is the trainable one (PEFT freezes inactive adapters). Returns the loss."""
    t = torch.randint(0, model.schedule.T, (x0.shape[0],), generator=generator).to(x0.device)
    n = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = model.schedule.add_noise(x0.detach(), n, t)
    with active_adapter(unet, FAKE):
        _, eps = model(x_t, t, cond)
        loss = F.mse_loss(eps.float(), n.float())
        loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------------
# The stage


@torch.no_grad()
def teacher_real_pool(cfg: PipelineConfig, model: Denoiser, unet, cond_all, uncond, out_art) -> tuple:
    """Teacher multi-step samples (DDIM + CFG) used as the GAN's real side; computed once, kept in the artifact."""
    fc = cfg.finetune
    if out_art.exists_file("gan_real_pool.safetensors"):
        t = out_art.load_tensors("gan_real_pool.safetensors")
        return t["latents"], t["prompt_idx"]
    g = torch.Generator().manual_seed(cfg.compute.seed + 77)
    lat, idx = [], torch.arange(fc.gan_real_pool) % len(cond_all)
    size = cfg.teacher.resolution // vae_scale_factor_of(cfg.teacher)
    with adapters_disabled(unet):
        for i in range(0, fc.gan_real_pool, fc.batch_size):
            j = idx[i:i + fc.batch_size]
            x_T = torch.randn((len(j), unet.config.in_channels, size, size), generator=g).to(unet.device)
            c = cond_all[j].to(unet.device)
            fn = teacher_x0_fn(model, c, uncond.to(unet.device), cfg.schedule.guidance)
            lat.append(ddim_sample(fn, x_T, ddim_timesteps(fc.gan_real_steps, model.schedule.T), model.schedule).cpu())
    lat = torch.cat(lat)
    out_art.save_tensors("gan_real_pool.safetensors", {"latents": lat, "prompt_idx": idx})
    return lat, idx


@dataclass
class Micro:
    """One micro-batch: its index fixes all its randomness; `loss` leaves what `after_step` needs on it."""

    index: int
    g: torch.Generator
    cond: Conditioning | None = None
    z0: torch.Tensor | None = None
    x0: torch.Tensor | None = None


class FinetuneObjective:
    """The finetune step's math (TLCM section 4.3) on one UNet holding the student and fake score adapters."""

    def __init__(self, cfg: PipelineConfig, pipe, prompts: list[str], cond_all, uncond, device, scorer, heads,
                 real_pool, optimizers: dict):
        self.cfg, self.fc, self.pipe, self.unet = cfg, cfg.finetune, pipe, pipe.unet
        self.model = Denoiser(pipe.unet, schedule_of(pipe))
        self.prompts, self.cond_all, self.uncond, self.device = prompts, cond_all, uncond, device
        self.scorer, self.heads, self.real_pool, self.opt = scorer, heads, real_pool, optimizers
        self.upper = sorted(milestones(self.model.schedule.T, cfg.schedule.segments))[1:]
        size = cfg.teacher.resolution // vae_scale_factor_of(cfg.teacher)
        self.shape = (self.unet.config.in_channels, size, size)

    def batches(self, start: int):
        seed = self.cfg.compute.seed
        return (Micro(k, torch.Generator().manual_seed(seed * 1_000_003 + k)) for k in itertools.count(start))

    def loss(self, b: Micro) -> dict[str, torch.Tensor]:
        fc, g, schedule, model = self.fc, b.g, self.model.schedule, self.model
        idx = torch.randint(len(self.prompts), (fc.batch_size,), generator=g)
        b.cond = cond = self.cond_all[idx].to(self.device)
        x_T = torch.randn((fc.batch_size, *self.shape), generator=g).to(self.device)
        with torch.no_grad():  # eq. 9: the student's clean latents, re-noised at a milestone
            b.z0 = student_clean_latents(lambda x, t: model(x, t, cond)[0], x_T, fc.q, schedule)
        t = torch.tensor(self.upper)[torch.randint(len(self.upper), (fc.batch_size,), generator=g)].to(self.device)
        z_t = schedule.add_noise(b.z0, torch.randn(b.z0.shape, generator=g).to(b.z0), t)
        x0, _ = model(z_t, t, cond)
        b.x0 = x0
        terms: dict[str, torch.Tensor] = {}
        if self.scorer is not None:  # TLCM eq. 11
            images = decode_latents_grad(self.pipe, x0)
            pos = [self.prompts[i] for i in idx.tolist()]
            neg = negative_prompts(pos, self.prompts, g)
            terms["reward"] = fc.reward_weight * reward_hinge(self.scorer(images, pos), self.scorer(images, neg),
                                                              fc.reward_margin).mean()
        if fc.dmd_weight:  # TLCM eq. 12
            td = torch.randint(fc.dmd_t_min, fc.dmd_t_max, (fc.batch_size,), generator=g).to(self.device)
            grad = dmd_gradient(model, self.unet, x0, td, torch.randn(x0.shape, generator=g).to(x0), cond,
                                self.uncond, self.cfg.schedule.guidance)
            terms["dmd"] = fc.dmd_weight * dmd_loss(x0, grad)
        if self.heads is not None:  # TLCM eq. 13, generator side
            tg = torch.randint(0, schedule.T, (fc.batch_size,), generator=g).to(self.device)
            ng = torch.randn(x0.shape, generator=g).to(x0)
            logits = discriminate(self.unet, self.heads, schedule.add_noise(x0, ng, tg), tg, cond)
            terms["gan_g"] = fc.gan_weight * gan_generator_loss(logits, fc.gan_loss)
        return terms

    def after_step(self, b: Micro, sync) -> dict[str, torch.Tensor]:
        """The fake score model follows the student's samples; the discriminator heads learn real vs fake."""
        fc, g, schedule, out = self.fc, b.g, self.model.schedule, {}
        if self.heads is not None:
            self.opt["disc"].zero_grad(set_to_none=True)  # the generator pass left grads on the heads
        if "fake" in self.opt:
            for _ in range(fc.fake_updates_per_step):
                out["fake"] = fake_score_backward(self.model, self.unet, b.x0.detach(), b.cond, g)
                sync(self.opt["fake"].param_groups[0]["params"])
                self.opt["fake"].step()
                self.opt["fake"].zero_grad(set_to_none=True)
        if self.heads is not None:
            if self.real_pool is not None:
                j = torch.randint(len(self.real_pool[0]), (fc.batch_size,), generator=g)
                real, rcond = self.real_pool[0][j].to(self.device), self.cond_all[self.real_pool[1][j]].to(self.device)
            else:  # eq. 13 as written: the student's own multi-step sample is the real side
                real, rcond = b.z0, b.cond
            td = torch.randint(0, schedule.T, (fc.batch_size,), generator=g).to(self.device)
            nd = torch.randn(b.x0.shape, generator=g).to(b.x0)
            ld = gan_discriminator_loss(
                discriminate(self.unet, self.heads, schedule.add_noise(real, nd, td), td, rcond),
                discriminate(self.unet, self.heads, schedule.add_noise(b.x0.detach(), nd, td), td, b.cond), fc.gan_loss)
            ld.backward()
            sync(list(self.heads.parameters()))
            self.opt["disc"].step()
            self.opt["disc"].zero_grad(set_to_none=True)
            self.opt["student"].zero_grad(set_to_none=True)
            out["gan_d"] = ld.detach()
        return out


def build_finetune(ctx: StageContext, device: torch.device) -> tuple[FinetuneObjective, TrainState]:
    """The teacher pipeline with the student LoRA (from the `init` input), the fake score adapter, the
    discriminator heads, their optimisers and the prompt conditioning."""
    cfg, fc = ctx.cfg, ctx.cfg.finetune
    pipe = load_pipeline(cfg.teacher, device, torch.float32)
    unet = pipe.unet
    load_lora_into(unet, read_lora(ctx.inputs["init"], cfg.lora, teacher_identity(cfg.teacher)).state, cfg.lora)
    prompts = load_prompts(cfg.trajectories.prompts)
    cond_all, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution)
    # the toy scorer scores toy-world prompts, whichever teacher draws them
    world = cfg.teacher.toy_world or toy_world(cfg.trajectories.prompts)
    scorer = build_scorer(fc.reward_scorer, fc.reward_model, fc.allow_pickle, world, device) if fc.reward_weight \
        else None
    if fc.dmd_weight:
        attach_lora(unet, LoRAConfig(rank=fc.fake_rank, alpha=fc.fake_rank, target_modules=cfg.lora.target_modules),
                    adapter_name=FAKE)
        unet.set_adapter(ADAPTER)
    heads = DiscriminatorHeads(unet.config.block_out_channels[-1]).to(device) if fc.gan_weight else None
    unet.train()
    student, fake = adapter_weights(unet, ADAPTER), adapter_weights(unet, FAKE)
    for p in student.parameters() + fake.parameters():
        p.requires_grad_(True)
    weights, opts = {"student": student}, {"student": make_optimizer(student.parameters(), fc)}
    if fake.params:
        weights["fake"], opts["fake"] = fake, torch.optim.AdamW(fake.parameters(), lr=fc.fake_score_lr)
    if heads is not None:
        weights["disc"] = heads
        opts["disc"] = torch.optim.AdamW(heads.parameters(), lr=fc.discriminator_lr, betas=(0.0, 0.99))
    objective = FinetuneObjective(cfg, pipe, prompts, cond_all, uncond.to(device), device, scorer, heads, None, opts)
    if fc.gan_weight and fc.gan_real == "teacher":
        objective.real_pool = teacher_real_pool(cfg, objective.model, unet, cond_all, objective.uncond, ctx.out)
    return objective, TrainState(weights, opts)


def run(ctx: StageContext) -> dict:
    fc, device = ctx.cfg.finetune, stage_device(ctx)
    objective, state = build_finetune(ctx, device)
    result = train(objective, state, fc, name="finetune", ckpt=CheckpointIO(ctx.out), reporter=ctx.reporter,
                   device=device, dtype=ctx.cfg.compute.dtype, accelerator=ctx.accelerator)
    summary = write_trained_lora(ctx, objective.unet, result, fc)
    return summary and {**summary, "terms": [k for k, w in (("reward", fc.reward_weight), ("dmd", fc.dmd_weight),
                                                            ("gan", fc.gan_weight)) if w]}


def _inputs(cfg: PipelineConfig) -> dict[str, str]:
    stage = final_lora_stage(cfg, before="finetune")
    if stage is None:
        raise ValueError("finetune needs a LoRA stage before it (mlcd or lcd) in the pipeline's stages")
    return {"init": stage}


STAGE = Stage("finetune", version=2, run=run, reads=("finetune", *TRAINER_READS, "schedule", "trajectories.prompts"),
              uses=("finetune.log_every", "finetune.checkpoint_every"), inputs=_inputs, trains=True,
              makes_lora=True)
