"""Stage `finetune`: the bag of techniques of TLCM section 4.3, all data-free, on the one student LoRA.

Per step (batch of prompts, noise from a per-step seed):
  z0  = the student's q-step sample (Algorithm 2), no grad;  z_t = eq. 9 at a milestone t;  x0 = f(z_t, t, c)
  reward (eq. 11):  max(margin - s(dec(x0), c), 0) + max(s(dec(x0), c_neg), 0), through the scorer and VAE
  DMD (eq. 12):     0.5 || x0 - sg(x0 - (x0_fake - x0_real) / w) ||^2 at a re-noised t' (Yin et al. 2024)
  GAN (eq. 13):     non-saturating or hinge loss of a discriminator = frozen teacher encoder + trainable heads
then the fake score model (its own LoRA on the same UNet) takes denoising steps on the student's samples,
and the discriminator heads take a step on real vs fake.

Phases (finetune.phases): the terms can also run as consecutive trainings of the one LoRA, each with its own
weights, length, batch size and fresh optimisers (the paper: the reward alone, then DMD + GAN), each
checkpointed under checkpoints/phase-N/ so a resumed run picks up in the phase it was in.

Memory: teacher, student, fake score model and discriminator are ONE UNet: the student and the fake score
model are two LoRA adapters on it, and the teacher / discriminator encoder are the same weights with the
adapters switched off. Only LoRAs, the heads and their optimizer states add to one frozen UNet.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import FinetuneConfig, LoRAConfig, PipelineConfig, toy_world
from ..consistency import adapter_weights, stage_device, write_trained_lora
from ..lora import ADAPTER, active_adapter, adapters_disabled, attach_lora, load_lora_into, read_lora
from ..models import (Conditioning, Denoiser, decode_latents_grad, encode_prompts, load_pipeline, schedule_of,
                      teacher_identity, vae_scale_factor_of)
from ..prompts import load_prompts
from ..rewards import build_scorer, negative_prompts, reward_hinge
from ..samplers import ddim_sample, student_clean_latents, teacher_x0_fn
from ..schedule import ddim_timesteps, milestones
from ..stage import Stage, StageContext
from ..training import CheckpointIO, TrainResult, TrainState, make_optimizer, train
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


@dataclass
class FinetuneModels:
    """What every phase of a finetune run shares: the pipeline, whose UNet holds the student and the fake score
    adapters (`model` sees it as a Denoiser), the prompts and their conditioning, and the reward scorer,
    discriminator heads and GAN real pool (None where no phase uses them)."""

    pipe: Any
    model: Denoiser
    prompts: list[str]
    cond_all: Conditioning
    uncond: Conditioning
    scorer: Any = None
    heads: DiscriminatorHeads | None = None
    real_pool: tuple | None = None


class FinetuneObjective:
    """The finetune step's math (TLCM section 4.3) on one UNet holding the student and fake score adapters, with
    one phase's settings `fc` (the finetune section itself when there are no phases). `first` is the phase's first
    micro-batch index: consecutive phases draw consecutive stretches of the one (seed, index) stream."""

    def __init__(self, cfg: PipelineConfig, fc: FinetuneConfig, models: FinetuneModels, device, optimizers: dict,
                 first: int = 0):
        self.cfg, self.fc, self.pipe, self.unet, self.model = cfg, fc, models.pipe, models.pipe.unet, models.model
        self.prompts, self.cond_all, self.uncond, self.device = models.prompts, models.cond_all, models.uncond, device
        # a term's models take part in the phases that weigh it only
        self.scorer = models.scorer if fc.reward_weight else None
        self.heads = models.heads if fc.gan_weight else None
        self.real_pool, self.opt, self.first = models.real_pool, optimizers, first
        self.upper = sorted(milestones(self.model.schedule.T, cfg.schedule.segments))[1:]
        size = cfg.teacher.resolution // vae_scale_factor_of(cfg.teacher)
        self.shape = (self.unet.config.in_channels, size, size)

    def batches(self, start: int):
        seed = self.cfg.compute.seed
        return (Micro(k, torch.Generator().manual_seed(seed * 1_000_003 + k))
                for k in itertools.count(self.first + start))

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


def build_finetune(ctx: StageContext, device: torch.device, phases: list[FinetuneConfig]) -> FinetuneModels:
    """The teacher pipeline with the student LoRA (from the `init` input), the prompt conditioning, and what the
    phases' terms need: the reward scorer, the fake score adapter, the discriminator heads, the GAN's real pool.

    Built once for all phases, not per phase: the fake score model and the heads carry their training on through
    the phases that use them (the fake score must keep following the one student), and PEFT and the heads draw
    their initial weights from the global RNG, so building them at a phase's start would make them depend on where
    a resumed run re-entered. Every phase's checkpoints hold them (`phase_state`)."""
    cfg, fc = ctx.cfg, ctx.cfg.finetune
    reward, dmd, gan = (any(getattr(p, w) for p in phases) for w in ("reward_weight", "dmd_weight", "gan_weight"))
    pipe = load_pipeline(cfg.teacher, device, torch.float32)
    unet = pipe.unet
    load_lora_into(unet, read_lora(ctx.inputs["init"], cfg.lora, teacher_identity(cfg.teacher)).state, cfg.lora)
    prompts = load_prompts(cfg.trajectories.prompts)
    cond_all, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution)
    # the toy scorer scores toy-world prompts, whichever teacher draws them
    world = cfg.teacher.toy_world or toy_world(cfg.trajectories.prompts)
    scorer = build_scorer(fc.reward_scorer, fc.reward_model, fc.allow_pickle, world, device) if reward else None
    torch.manual_seed(cfg.compute.seed)  # the fake adapter's and the heads' initial weights, whatever ran before
    if dmd:
        attach_lora(unet, LoRAConfig(rank=fc.fake_rank, alpha=fc.fake_rank, target_modules=cfg.lora.target_modules),
                    adapter_name=FAKE)
        unet.set_adapter(ADAPTER)
    heads = DiscriminatorHeads(unet.config.block_out_channels[-1]).to(device) if gan else None
    unet.train()
    for p in adapter_weights(unet, ADAPTER).parameters() + adapter_weights(unet, FAKE).parameters():
        p.requires_grad_(True)
    models = FinetuneModels(pipe, Denoiser(unet, schedule_of(pipe)), prompts, cond_all, uncond.to(device), scorer,
                            heads)
    if gan and fc.gan_real == "teacher":
        models.real_pool = teacher_real_pool(cfg, models.model, unet, cond_all, models.uncond, ctx.out)
    return models


def phase_state(models: FinetuneModels, fc: FinetuneConfig) -> TrainState:
    """One phase's TrainState: every trainable model there is, so that each phase's checkpoints hold all that the
    phases after it start from, and fresh optimisers (as separate runs would have) for those this phase trains."""
    unet = models.pipe.unet
    student, fake = adapter_weights(unet, ADAPTER), adapter_weights(unet, FAKE)
    weights, opts = {"student": student}, {"student": make_optimizer(student.parameters(), fc)}
    if fake.params:
        weights["fake"] = fake
        if fc.dmd_weight:
            opts["fake"] = torch.optim.AdamW(fake.parameters(), lr=fc.fake_score_lr)
    if models.heads is not None:
        weights["disc"] = models.heads
        if fc.gan_weight:
            opts["disc"] = torch.optim.AdamW(models.heads.parameters(), lr=fc.discriminator_lr, betas=(0.0, 0.99))
    return TrainState(weights, opts)


def _terms(fc: FinetuneConfig) -> list[str]:
    return [k for k, w in (("reward", fc.reward_weight), ("dmd", fc.dmd_weight), ("gan", fc.gan_weight)) if w]


# the column of a term in a log row; `train` logs terms only when there are several, so a one-term phase's rows
# get its column from `loss`, which then is that term
TERM_COLUMNS = {"reward": "reward", "dmd": "dmd", "gan": "gan_g"}


def _phased_result(phases: list[FinetuneConfig], results: list[TrainResult]) -> TrainResult:
    """The phases' trainings as one: every log row with its `phase` (1, 2, ...) and `step` counted through all
    phases; resumed from the step (so counted) where this run's training began, and its rate over all of it."""
    log, offset, seconds = [], 0, 0.0
    for i, (fc, r) in enumerate(zip(phases, results), 1):
        terms = _terms(fc)
        for row in r.log:
            row = {"phase": i, **row, "step": offset + row["step"]}
            if len(terms) == 1:
                row.setdefault(TERM_COLUMNS[terms[0]], row["loss"])
            log.append(row)
        offset += fc.iterations
        seconds += (fc.iterations - r.start_step) / r.steps_per_second if r.steps_per_second else 0.0
    done = sum(fc.iterations - r.start_step for fc, r in zip(phases, results))
    return TrainResult(log, sum(r.start_step for r in results), done / seconds if seconds else 0.0)


def _phased_summary(ctx: StageContext, unet, phases: list[FinetuneConfig], results: list[TrainResult]) -> dict:
    """The LoRA, the phases' log as one (with its `phase` column) and a summary with each phase's own numbers."""
    result = _phased_result(phases, results)
    # write_trained_lora reads the trainer config for its iteration count: the phases' together
    total = phases[-1].model_copy(update={"iterations": sum(fc.iterations for fc in phases)})
    summary = write_trained_lora(ctx, unet, result, total)
    if not summary:  # not the main process
        return summary
    per_phase = []
    for i, (fc, r) in enumerate(zip(phases, results), 1):
        last = next((row for row in reversed(result.log) if row["phase"] == i), {})
        per_phase.append({"phase": i, "iterations": fc.iterations, "batch_size": fc.batch_size, "terms": _terms(fc),
                          "resumed_from_step": r.start_step,
                          "final": {k: v for k, v in last.items() if k not in ("phase", "step", "lr", "elapsed_s")}})
    return {**summary, "final": {k: v for k, v in summary["final"].items() if k != "phase"},
            "terms": [t for t in ("reward", "dmd", "gan") if any(t in p["terms"] for p in per_phase)],
            "phases": per_phase}


def run(ctx: StageContext) -> dict:
    """One training of the finetune section, or (finetune.phases) one per phase, in order, on the one LoRA."""
    cfg, device = ctx.cfg, stage_device(ctx)
    phased, phases = bool(cfg.finetune.phases), cfg.finetune.phase_configs()
    models = build_finetune(ctx, device, phases)
    world = ctx.accelerator.num_processes if ctx.accelerator is not None else 1
    results, first = [], 0
    for i, fc in enumerate(phases, 1):
        if not any(p.reward_weight for p in phases[i - 1:]):
            models.scorer = None  # no phase from here on scores: free it (MPS is a ViT-H)
        state = phase_state(models, fc)
        objective = FinetuneObjective(cfg, fc, models, device, state.optimizers, first=first)
        # without phases: the checkpoints, progress key and log of the single run as they always were
        name, ckpt = (f"finetune-phase-{i}", CheckpointIO(ctx.out, prefix=f"checkpoints/phase-{i}")) if phased \
            else ("finetune", CheckpointIO(ctx.out))
        results.append(train(objective, state, fc, name=name, ckpt=ckpt, reporter=ctx.reporter, device=device,
                             dtype=cfg.compute.dtype, accelerator=ctx.accelerator, save_final=phased))
        first += fc.iterations * fc.grad_accum * world  # the micro-batches this phase drew, over all ranks
    if phased:
        return _phased_summary(ctx, models.pipe.unet, phases, results)
    summary = write_trained_lora(ctx, models.pipe.unet, results[0], phases[0])
    return summary and {**summary, "terms": _terms(phases[0])}


def _inputs(cfg: PipelineConfig) -> dict[str, str]:
    stage = final_lora_stage(cfg, before="finetune")
    if stage is None:
        raise ValueError("finetune needs a LoRA stage before it (mlcd or lcd) in the pipeline's stages")
    return {"init": stage}


STAGE = Stage("finetune", version=3, run=run, reads=("finetune", *TRAINER_READS, "schedule", "trajectories.prompts"),
              uses=("finetune.log_every", "finetune.checkpoint_every"), inputs=_inputs, trains=True,
              makes_lora=True)
