"""Stage `finetune`: the bag of techniques of TLCM section 4.3, all data-free, on the one student LoRA.

Per step (batch of prompts, noise from a per-step seed):
  z0  = the student's q-step sample (Algorithm 2), no grad;  z_t = eq. 9 at a milestone t;  x0 = f(z_t, t, c)
  reward (eq. 11):  max(margin - s(dec(x0), c), 0) + max(s(dec(x0), c_neg), 0), through the scorer and VAE
  DMD (eq. 12):     0.5 || x0 - sg(x0 - (x0_fake - x0_real) / w) ||^2 at a re-noised t' (Yin et al. 2024)
  GAN (eq. 13):     non-saturating or hinge loss of a discriminator = frozen teacher features + trainable heads
  regression:       || f(x_T, T-1, c) - teacher's sample from x_T ||^2 on a pool of noises (not in TLCM: DMD's
                    regression loss, Yin et al. 2024 sec. 3.3), aimed at the one-step prediction from pure noise
then the fake score model (its own LoRA on the same network) takes denoising steps on the student's samples,
and the discriminator heads take a step on real vs fake.

Any teacher family (tlcm_core/families/): the network, its schedule (a flow teacher's at teacher.resolution), the
latents' shape, the prompt encoding and the discriminator's features come from the family. The discriminator reads
the frozen teacher's features: a UNet's encoder half (down blocks and mid block), FLUX.1's image stream after its
double-stream blocks, SD3's image tokens after the first half of its joint blocks; transformer features are laid out
on the latent patch grid and read by heads that first project them (TokenDiscriminatorHeads). The fake score model
learns the teacher's own training target (eps for a DDPM-time UNet, the velocity for a flow teacher). The reward
decodes through the family's VAE scale and shift; the GAN's real pool is the teacher's own baseline sampler (DDIM +
CFG, or a flow teacher's Euler on its stock grid). DMD only needs x0 and is the same for every family.

Phases (finetune.phases): the terms can also run as consecutive trainings of the one LoRA, each with its own
weights, length, batch size and fresh optimisers (the paper: the reward alone, then DMD + GAN), each
checkpointed under checkpoints/phase-N/ so a resumed run picks up in the phase it was in.

Memory: teacher, student, fake score model and discriminator are ONE network: the student and the fake score
model are two LoRA adapters on it, and the teacher / discriminator features are the same weights with the
adapters switched off. Only LoRAs, the heads and their optimizer states add to one frozen network
(compute.gradient_checkpointing recomputes each block with the adapters as they were; bench/RESULTS.md has the
memory of FLUX.1-dev on one GPU).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import TERM_WEIGHTS, FinetuneConfig, LoRAConfig, PipelineConfig, toy_world
from ..consistency import adapter_weights, stage_device, write_trained_lora
from ..lora import (ADAPTER, active_adapter, adapters_disabled, attach_lora, load_lora_into, read_lora,
                    set_lora_forward)
from ..families import family_of
from ..models import (Conditioning, Denoiser, decode_latents_grad, encode_prompts, latent_shape, load_pipeline,
                      network_of, teacher_denoiser, teacher_grid, teacher_identity)
from ..prompts import load_prompts
from ..rewards import build_scorer, negative_prompts, reward_hinge
from ..samplers import student_clean_latents, teacher_sample, tlcm_states
from ..schedule import milestones, sampler_timesteps
from ..stage import Stage, StageContext
from ..training import CheckpointIO, TrainResult, TrainState, autocast_for, make_optimizer, train
from .common import TRAINER_READS, final_lora_stage

FAKE = "fake"


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator: the frozen teacher's features (ModelFamily.discriminator_features) + small trainable heads


class DiscriminatorHeads(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.GroupNorm(1, channels), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))


class TokenDiscriminatorHeads(torch.nn.Module):
    """Heads for a transformer's image tokens on their patch grid (B, D, h', w'): each token normalised (a
    transformer's hidden states carry a few channels of very large magnitude) and projected to `width` channels,
    then DiscriminatorHeads' conv-norm-act-conv over the grid. Projected first because the UNet heads' 3x3 conv at
    FLUX.1's D = 3072 would be 85 M parameters; at width 256 the heads are 1.4 M."""

    def __init__(self, channels: int, width: int = 256):
        super().__init__()
        width = min(width, channels)
        self.norm = torch.nn.LayerNorm(channels, elementwise_affine=False)
        self.proj = torch.nn.Linear(channels, width)
        self.grid = DiscriminatorHeads(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.norm(features.permute(0, 2, 3, 1)))
        return self.grid(tokens.permute(0, 3, 1, 2))


def discriminator_heads(net) -> torch.nn.Module:
    """The trainable heads on the network's discriminator features: conv heads on a UNet's feature map, token heads
    on a transformer's."""
    family = family_of(net)
    channels = family.discriminator_channels(net.config)
    return DiscriminatorHeads(channels) if family.name == "unet" else TokenDiscriminatorHeads(channels)


def discriminate(unet, heads: torch.nn.Module, x, t, cond, schedule=None) -> torch.Tensor:
    """Logits (B,) of real vs fake for noised latents; the features are the teacher's (every adapter off).
    `schedule`: the network's (a flow transformer is called at its sigmas; a UNet takes t as it is)."""
    with adapters_disabled(unet):
        return heads(family_of(unet).discriminator_features(unet, x, t, cond, schedule))


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
    """The fake score model's denoising loss on the student's (detached) samples at a random t: the teacher's own
    training target (eps-MSE for a DDPM-time UNet; for a flow teacher the velocity MSE of rectified flow, which
    eps-MSE would weigh by (1 - sigma)^2, nearly nothing at the high noise levels a shifted FLUX schedule favours),
    back-propagated while its adapter is the trainable one (PEFT freezes inactive adapters). Returns the loss."""
    t = torch.randint(0, model.schedule.T, (x0.shape[0],), generator=generator).to(x0.device)
    n = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = model.schedule.add_noise(x0.detach(), n, t)
    with active_adapter(unet, FAKE):
        x0_fake, eps = model(x_t, t, cond)
        if model.schedule.prediction_type == "flow":  # v = eps - x0
            loss = F.mse_loss((eps - x0_fake).float(), (n - x0.detach()).float())
        else:
            loss = F.mse_loss(eps.float(), n.float())
        loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------------
# The stage


@torch.no_grad()
def teacher_pool(cfg: PipelineConfig, pipe, model: Denoiser, cond_all, uncond, out_art, *, name: str, size: int,
                 steps: int, seed: int, reporter=None) -> dict[str, torch.Tensor]:
    """`size` teacher samples by the teacher's own baseline sampler (DDIM + CFG on trailing timesteps; a flow
    teacher's Euler on its stock grid with its guidance) at `steps` steps, with the noise each started from and its
    prompt's index (prompts in turn): {"noise", "latents", "prompt_idx"}. In compute.dtype on a GPU (autocast, as
    training). Computed once, kept in the artifact as `name`, so a resumed run reuses it."""
    if out_art.exists_file(name):
        return out_art.load_tensors(name)
    fc, unet = cfg.finetune, model.unet
    g = torch.Generator().manual_seed(seed)
    noise, lat, idx = [], [], torch.arange(size) % len(cond_all)
    shape = latent_shape(pipe, cfg.teacher.resolution)
    grid = teacher_grid(pipe, cfg.teacher.resolution, steps)
    with adapters_disabled(unet), autocast_for(unet.device, cfg.compute.dtype):
        for i in range(0, size, fc.batch_size):
            j = idx[i:i + fc.batch_size]
            noise.append(torch.randn((len(j), *shape), generator=g))
            c = cond_all[j].to(unet.device)
            lat.append(teacher_sample(model, noise[-1].to(unet.device), steps, c, uncond.to(unet.device),
                                      cfg.schedule.guidance, grid).float().cpu())
            if reporter is not None:
                reporter.progress(f"finetune: {name}", i + len(j), size)
    pool = {"noise": torch.cat(noise), "latents": torch.cat(lat), "prompt_idx": idx}
    out_art.save_tensors(name, pool)
    return pool


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
    """What every phase of a finetune run shares: the pipeline, whose network holds the student and the fake score
    adapters (`model` sees it as a Denoiser), the prompts and their conditioning, and the reward scorer,
    discriminator heads and GAN real pool (None where no phase uses them)."""

    pipe: Any
    model: Denoiser
    prompts: list[str]
    cond_all: Conditioning
    uncond: Conditioning
    scorer: Any = None
    heads: torch.nn.Module | None = None
    real_pool: dict[str, torch.Tensor] | None = None  # teacher_pool's: the GAN's real side (gan_real=teacher)
    pairs: dict[str, torch.Tensor] | None = None  # teacher_pool's: the paired regression's noises and targets


class FinetuneObjective:
    """The finetune step's math (TLCM section 4.3) on one network holding the student and fake score adapters, with
    one phase's settings `fc` (the finetune section itself when there are no phases). `first` is the phase's first
    micro-batch index: consecutive phases draw consecutive stretches of the one (seed, index) stream."""

    def __init__(self, cfg: PipelineConfig, fc: FinetuneConfig, models: FinetuneModels, device, optimizers: dict,
                 first: int = 0):
        self.cfg, self.fc, self.pipe, self.unet, self.model = cfg, fc, models.pipe, models.model.unet, models.model
        self.prompts, self.cond_all, self.uncond, self.device = models.prompts, models.cond_all, models.uncond, device
        # a term's models take part in the phases that weigh it only
        self.scorer = models.scorer if fc.reward_weight else None
        self.heads = models.heads if fc.gan_weight else None
        self.real_pool, self.opt, self.first = models.real_pool, optimizers, first
        self.pairs = models.pairs if fc.regression_weight else None
        bounds = milestones(self.model.schedule.T, cfg.schedule.segments)
        self.upper = sorted(bounds)[1:]
        self.top = max(bounds)  # every sampler's first timestep: pure noise
        self.grids = {n: sampler_timesteps(n, bounds, fc.sampler_grid, self.model.schedule) for n in fc.sampler_steps}
        self.shape = latent_shape(self.pipe, cfg.teacher.resolution)
        self.dmd_guidance = cfg.schedule.guidance if fc.dmd_guidance is None else fc.dmd_guidance  # the real score's

    def batches(self, start: int):
        seed = self.cfg.compute.seed
        return (Micro(k, torch.Generator().manual_seed(seed * 1_000_003 + k))
                for k in itertools.count(self.first + start))

    def loss(self, b: Micro) -> dict[str, torch.Tensor]:
        fc, g, schedule, model = self.fc, b.g, self.model.schedule, self.model
        idx = torch.randint(len(self.prompts), (fc.batch_size,), generator=g)
        b.cond = cond = self.cond_all[idx].to(self.device)
        x_T = torch.randn((fc.batch_size, *self.shape), generator=g).to(self.device)
        if fc.inputs == "sampler":
            z_t, t = self.sampler_states(b, x_T)
        else:
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
                                self.uncond, self.dmd_guidance)
            terms["dmd"] = fc.dmd_weight * dmd_loss(x0, grad)
        if self.heads is not None:  # TLCM eq. 13, generator side
            tg = torch.randint(0, schedule.T, (fc.batch_size,), generator=g).to(self.device)
            ng = torch.randn(x0.shape, generator=g).to(x0)
            logits = discriminate(self.unet, self.heads, schedule.add_noise(x0, ng, tg), tg, cond, schedule)
            terms["gan_g"] = fc.gan_weight * gan_generator_loss(logits, fc.gan_loss)
        if self.pairs is not None:  # DMD's regression loss (Yin et al. 2024, sec. 3.3): the one step from noise
            j = torch.randint(len(self.pairs["noise"]), (fc.batch_size,), generator=g)
            x_T = self.pairs["noise"][j].to(self.device)
            top = torch.full((fc.batch_size,), self.top, device=self.device)
            x0_T, _ = model(x_T, top, self.cond_all[self.pairs["prompt_idx"][j]].to(self.device))
            terms["regression"] = fc.regression_weight * F.mse_loss(x0_T.float(),
                                                                    self.pairs["latents"][j].to(x0_T).float())
        return terms

    @torch.no_grad()
    def sampler_states(self, b: Micro, x_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DMD2's backward simulation: the N-step TLCM sampler (N drawn from finetune.sampler_steps) from x_T with
        fresh re-noising, as at inference; each sample's input is its state at a milestone drawn evenly from the N.
        Runs only the steps the drawn states need, plus the rest when the GAN's real side is the student's own
        multi-step sample (b.z0)."""
        fc, g, schedule, model = self.fc, b.g, self.model.schedule, self.model
        ts = self.grids[fc.sampler_steps[int(torch.randint(len(fc.sampler_steps), (1,), generator=g))]]
        pick = torch.randint(len(ts), (fc.batch_size,), generator=g)
        noises = [torch.randn(x_T.shape, generator=g).to(x_T) for _ in ts[1:]]
        own_sample = self.heads is not None and self.real_pool is None
        run = tlcm_states(lambda x, t: model(x, t, b.cond)[0], x_T, ts, schedule, noises=noises)
        states = list(itertools.islice(run, len(ts) + 1 if own_sample else int(pick.max()) + 1))
        if own_sample:
            b.z0 = states.pop()
        z_t = torch.stack(states)[pick.to(x_T.device), torch.arange(fc.batch_size, device=x_T.device)]
        return z_t, torch.tensor(ts)[pick].to(self.device)

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
                j = torch.randint(len(self.real_pool["latents"]), (fc.batch_size,), generator=g)
                real = self.real_pool["latents"][j].to(self.device)
                rcond = self.cond_all[self.real_pool["prompt_idx"][j]].to(self.device)
            else:  # eq. 13 as written: the student's own multi-step sample is the real side
                real, rcond = b.z0, b.cond
            td = torch.randint(0, schedule.T, (fc.batch_size,), generator=g).to(self.device)
            nd = torch.randn(b.x0.shape, generator=g).to(b.x0)
            ld = gan_discriminator_loss(
                discriminate(self.unet, self.heads, schedule.add_noise(real, nd, td), td, rcond, schedule),
                discriminate(self.unet, self.heads, schedule.add_noise(b.x0.detach(), nd, td), td, b.cond, schedule),
                fc.gan_loss)
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
    reward, dmd, gan, regression = (any(getattr(p, w) for p in phases) for w in TERM_WEIGHTS)
    pipe = load_pipeline(cfg.teacher, device, torch.float32)
    unet = network_of(pipe)  # the UNet or the transformer: the student, fake score, teacher and discriminator
    load_lora_into(unet, read_lora(ctx.inputs["init"], cfg.lora, teacher_identity(cfg.teacher)).state, cfg.lora)
    prompts = load_prompts(cfg.trajectories.prompts)
    cond_all, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution,
                                      max_sequence_length=cfg.teacher.max_sequence_length)
    for part in family_of(unet).text_encoder_parts:  # used once, just above (FLUX.1's T5-XXL alone is 4.8 B)
        if getattr(pipe, part, None) is not None:
            setattr(pipe, part, None)
    # the toy scorer scores toy-world prompts, whichever teacher draws them
    world = cfg.teacher.toy_world or toy_world(cfg.trajectories.prompts)
    scorer = build_scorer(fc.reward_scorer, fc.reward_model, fc.allow_pickle, world, device) if reward else None
    torch.manual_seed(cfg.compute.seed)  # the fake adapter's and the heads' initial weights, whatever ran before
    if dmd:
        attach_lora(unet, LoRAConfig(rank=fc.fake_rank, alpha=fc.fake_rank, target_modules=cfg.lora.target_modules),
                    adapter_name=FAKE)
        unet.set_adapter(ADAPTER)
    set_lora_forward(unet, cfg.compute.lora_forward)  # the student's and the fake score's adapters
    heads = discriminator_heads(unet).to(device) if gan else None
    if cfg.compute.gradient_checkpointing:
        family_of(unet).enable_gradient_checkpointing(unet)
    unet.train()
    for p in adapter_weights(unet, ADAPTER).parameters() + adapter_weights(unet, FAKE).parameters():
        p.requires_grad_(True)
    models = FinetuneModels(pipe, teacher_denoiser(pipe, cfg.teacher.resolution), prompts, cond_all,
                            uncond.to(device), scorer, heads)
    if gan and fc.gan_real == "teacher":
        models.real_pool = teacher_pool(cfg, pipe, models.model, cond_all, models.uncond, ctx.out,
                                        name="gan_real_pool.safetensors", size=fc.gan_real_pool,
                                        steps=fc.gan_real_steps, seed=cfg.compute.seed + 77, reporter=ctx.reporter)
    if regression:
        models.pairs = teacher_pool(cfg, pipe, models.model, cond_all, models.uncond, ctx.out,
                                    name="regression_pairs.safetensors", size=fc.regression_pairs,
                                    steps=fc.regression_steps, seed=cfg.compute.seed + 78, reporter=ctx.reporter)
    return models


def phase_state(models: FinetuneModels, fc: FinetuneConfig) -> TrainState:
    """One phase's TrainState: every trainable model there is, so that each phase's checkpoints hold all that the
    phases after it start from, and fresh optimisers (as separate runs would have) for those this phase trains."""
    unet = models.model.unet
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


TERMS = ("reward", "dmd", "gan", "regression")  # in TERM_WEIGHTS' order


def _terms(fc: FinetuneConfig) -> list[str]:
    return [k for k, w in zip(TERMS, TERM_WEIGHTS) if getattr(fc, w)]


# the column of a term in a log row; `train` logs terms only when there are several, so a one-term phase's rows
# get its column from `loss`, which then is that term
TERM_COLUMNS = {"reward": "reward", "dmd": "dmd", "gan": "gan_g", "regression": "regression"}


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
            "terms": [t for t in TERMS if any(t in p["terms"] for p in per_phase)],
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
        return _phased_summary(ctx, models.model.unet, phases, results)
    summary = write_trained_lora(ctx, models.model.unet, results[0], phases[0])
    return summary and {**summary, "terms": _terms(phases[0])}


def _inputs(cfg: PipelineConfig) -> dict[str, str]:
    stage = final_lora_stage(cfg, before="finetune")
    if stage is None:
        raise ValueError("finetune needs a LoRA stage before it (mlcd or lcd) in the pipeline's stages")
    return {"init": stage}


STAGE = Stage("finetune", version=3, run=run, reads=("finetune", *TRAINER_READS, "schedule", "trajectories.prompts"),
              uses=("finetune.log_every", "finetune.checkpoint_every", "compute.gradient_checkpointing"),
              inputs=_inputs, trains=True, makes_lora=True)
