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

import json
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .config import LoRAConfig, PipelineConfig
from .consistency import open_lora
from .evaluate import toy_world_of
from .lcd import adapters_disabled, student_clean_latents
from .lora import ADAPTER, attach_lora, load_lora_into, lora_metadata, lora_state_dict
from .models import (Conditioning, Denoiser, decode_latents_grad, encode_prompts, load_pipeline, resolve_device,
                     teacher_identity)
from .progress import Reporter
from .rewards import build_scorer, negative_prompts, reward_hinge
from .schedule import milestones
from .train import Checkpointer, autocast_for, make_optimizer
from .trajectories import schedule_of

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


@contextmanager
def active_adapter(unet, name: str):
    unet.set_adapter(name)
    try:
        yield
    finally:
        unet.set_adapter(ADAPTER)


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


def _params(unet, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter}." in n]


def _prefixed(prefix: str, sd: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in sd.items()}


def _unprefixed(prefix: str, sd: dict) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@torch.no_grad()
def teacher_real_pool(cfg: PipelineConfig, model: Denoiser, unet, cond_all, uncond, out_art) -> tuple:
    """Teacher multi-step samples (DDIM + CFG) used as the GAN's real side; computed once, kept in the artifact."""
    from .samplers import ddim_sample, teacher_x0_fn
    from .schedule import ddim_timesteps

    fc = cfg.finetune
    if out_art.exists_file("gan_real_pool.safetensors"):
        t = out_art.load_tensors("gan_real_pool.safetensors")
        return t["latents"], t["prompt_idx"]
    g = torch.Generator().manual_seed(cfg.compute.seed + 77)
    lat, idx = [], torch.arange(fc.gan_real_pool) % len(cond_all)
    size = cfg.teacher.resolution // cfg_vae_factor(cfg)
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


def cfg_vae_factor(cfg: PipelineConfig) -> int:
    from .models import vae_scale_factor_of

    return vae_scale_factor_of(cfg.teacher)


def run_finetune(cfg: PipelineConfig, init_art, out_art, reporter: Reporter) -> dict:
    from .prompts import load_prompts

    fc = cfg.finetune
    if not (fc.reward_weight or fc.dmd_weight or fc.gan_weight):
        raise ValueError("finetune: reward_weight, dmd_weight and gan_weight are all 0; enable at least one term")
    device = resolve_device(cfg.compute)
    pipe = load_pipeline(cfg.teacher, device, torch.float32)
    unet = pipe.unet
    load_lora_into(unet, open_lora(cfg, init_art.uri, init_art.store), cfg.lora)
    schedule = schedule_of(pipe)
    model = Denoiser(unet, schedule)
    prompts = load_prompts(cfg.trajectories.prompts)
    cond_all, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution)
    uncond = uncond.to(device)
    src = cfg.trajectories.prompts  # the toy scorer scores toy-world prompts, whichever teacher draws them
    world = toy_world_of(cfg) or (src.split(":", 1)[1] if src.startswith("toy:") else "toy" if src == "toy" else None)
    scorer = build_scorer(fc.reward_scorer, fc.reward_model, fc.allow_pickle, world, device) if fc.reward_weight \
        else None
    if fc.dmd_weight:
        attach_lora(unet, LoRAConfig(rank=fc.fake_rank, alpha=fc.fake_rank, target_modules=cfg.lora.target_modules),
                    adapter_name=FAKE)
        unet.set_adapter(ADAPTER)
    heads = None
    if fc.gan_weight:
        heads = DiscriminatorHeads(unet.config.block_out_channels[-1]).to(device)
    unet.train()
    p_student, p_fake = _params(unet, ADAPTER), _params(unet, FAKE)
    for p in p_student + p_fake:
        p.requires_grad_(True)
    opt_s = make_optimizer(p_student, fc)
    opt_f = torch.optim.AdamW(p_fake, lr=fc.fake_score_lr) if p_fake else None
    opt_d = torch.optim.AdamW(heads.parameters(), lr=fc.discriminator_lr, betas=(0.0, 0.99)) if heads else None
    real_pool = teacher_real_pool(cfg, model, unet, cond_all, uncond, out_art) \
        if fc.gan_weight and fc.gan_real == "teacher" else None

    ckpt = Checkpointer(out_art)
    step, log = 0, []
    info = ckpt.latest()
    if info is not None:
        tensors, state = ckpt.load(info)
        load_lora_into(unet, _unprefixed("student.", tensors), cfg.lora)
        opt_s.load_state_dict(state["opt_s"])
        if opt_f is not None:
            fake = _unprefixed("fake.", tensors)
            with torch.no_grad():
                named = dict(unet.named_parameters())
                for k, v in fake.items():
                    named[k].copy_(v)
            opt_f.load_state_dict(state["opt_f"])
        if heads is not None:
            heads.load_state_dict(_unprefixed("disc.", tensors))
            opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["rng"])
        step, log = int(state["step"]), state["log"]
        reporter.log(f"finetune: resuming from checkpoint step {step}")
    start = step
    reporter.progress("finetune", step, fc.iterations)
    upper = sorted(milestones(schedule.T, cfg.schedule.segments))[1:]
    size = cfg.teacher.resolution // cfg_vae_factor(cfg)
    shape = (unet.config.in_channels, size, size)
    sums: dict[str, float] = {}
    t0 = time.perf_counter()
    while step < fc.iterations:
        g = torch.Generator().manual_seed(cfg.compute.seed * 1_000_003 + step)  # the step's randomness
        idx = torch.randint(len(prompts), (fc.batch_size,), generator=g)
        cond = cond_all[idx].to(device)
        x_T = torch.randn((fc.batch_size, *shape), generator=g).to(device)
        with torch.no_grad():  # eq. 9: the student's clean latents, re-noised at a milestone
            z0 = student_clean_latents(lambda x, t: model(x, t, cond)[0], x_T, fc.q, schedule)
        t = torch.tensor(upper)[torch.randint(len(upper), (fc.batch_size,), generator=g)].to(device)
        z_t = schedule.add_noise(z0, torch.randn(z0.shape, generator=g).to(z0), t)
        terms: dict[str, torch.Tensor] = {}
        with autocast_for(device, cfg.compute.dtype):
            x0, _ = model(z_t, t, cond)
            if scorer is not None:  # TLCM eq. 11
                images = decode_latents_grad(pipe, x0)
                neg = negative_prompts([prompts[i] for i in idx.tolist()], prompts, g)
                s_pos = scorer(images, [prompts[i] for i in idx.tolist()])
                s_neg = scorer(images, neg)
                terms["reward"] = fc.reward_weight * reward_hinge(s_pos, s_neg, fc.reward_margin).mean()
            if fc.dmd_weight:  # TLCM eq. 12
                td = torch.randint(fc.dmd_t_min, fc.dmd_t_max, (fc.batch_size,), generator=g).to(device)
                grad = dmd_gradient(model, unet, x0, td, torch.randn(x0.shape, generator=g).to(x0), cond, uncond,
                                    cfg.schedule.guidance)
                terms["dmd"] = fc.dmd_weight * dmd_loss(x0, grad)
            if heads is not None:  # TLCM eq. 13, generator side
                tg = torch.randint(0, schedule.T, (fc.batch_size,), generator=g).to(device)
                ng = torch.randn(x0.shape, generator=g).to(x0)
                terms["gan_g"] = fc.gan_weight * gan_generator_loss(
                    discriminate(unet, heads, schedule.add_noise(x0, ng, tg), tg, cond), fc.gan_loss)
        loss = sum(terms.values())
        loss.backward()
        if fc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(p_student, fc.max_grad_norm)
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        if heads is not None:
            opt_d.zero_grad(set_to_none=True)  # the generator pass left grads on the heads
        if opt_f is not None:  # the fake score model follows the student's distribution
            for _ in range(fc.fake_updates_per_step):
                lf = fake_score_backward(model, unet, x0.detach(), cond, g)
                opt_f.step()
                opt_f.zero_grad(set_to_none=True)
            terms["fake"] = lf.detach()
        if heads is not None:  # discriminator heads: real vs the student's one-step outputs
            if real_pool is not None:
                j = torch.randint(len(real_pool[0]), (fc.batch_size,), generator=g)
                real, rcond = real_pool[0][j].to(device), cond_all[real_pool[1][j]].to(device)
            else:  # eq. 13 as written: the student's own multi-step sample is the real side
                real, rcond = z0, cond
            td = torch.randint(0, schedule.T, (fc.batch_size,), generator=g).to(device)
            nd = torch.randn(x0.shape, generator=g).to(x0)
            ld = gan_discriminator_loss(discriminate(unet, heads, schedule.add_noise(real, nd, td), td, rcond),
                                        discriminate(unet, heads, schedule.add_noise(x0.detach(), nd, td), td, cond),
                                        fc.gan_loss)
            ld.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            opt_s.zero_grad(set_to_none=True)
            terms["gan_d"] = ld.detach()
        step += 1
        for k, v in terms.items():  # summed on the device: one host sync per log interval, not per step
            sums[k] = sums.get(k, 0.0) + v.detach()
        if step % fc.log_every == 0 or step == fc.iterations:
            n = fc.log_every if step % fc.log_every == 0 else (step % fc.log_every)
            rec = {"step": step, **{k: float(v) / n for k, v in sums.items()},
                   "elapsed_s": round(time.perf_counter() - t0, 3)}
            log.append(rec)
            sums = {}
            reporter.progress("finetune", step, fc.iterations, **{k: v for k, v in rec.items() if k != "step"})
        if step % fc.checkpoint_every == 0 and step < fc.iterations:
            tensors = _prefixed("student.", lora_state_dict(unet))
            if p_fake:
                tensors |= {f"fake.{n}": p.detach().cpu().contiguous() for n, p in unet.named_parameters()
                            if "lora_" in n and f".{FAKE}." in n}
            if heads is not None:
                tensors |= _prefixed("disc.", {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()})
            state = {"opt_s": opt_s.state_dict(), "log": log}
            if opt_f is not None:
                state["opt_f"] = opt_f.state_dict()
            if opt_d is not None:
                state["opt_d"] = opt_d.state_dict()
            ckpt.save(step, tensors, state)
    out_art.save_tensors("lora.safetensors", lora_state_dict(unet),
                         metadata=lora_metadata(cfg.lora, teacher_identity(cfg.teacher)))
    out_art.write_bytes("train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
    reporter.table("finetune-loss", log, description="finetune loss terms")
    last = log[-1] if log else {}
    return {"iterations": fc.iterations, "resumed_from_step": start,
            "final": {k: v for k, v in last.items() if k not in ("step", "elapsed_s")},
            "terms": [k for k, w in (("reward", fc.reward_weight), ("dmd", fc.dmd_weight), ("gan", fc.gan_weight))
                      if w]}
