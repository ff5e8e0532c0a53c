"""Stage 2: improved data-free latent consistency distillation across milestones (TLCM section 4.2).

`lcd-trajectories` (Algorithm 2, eq. 9): clean latents from the stage-1 student with a q-step sampler,
forward diffusion to a milestone t_m, and the teacher's p-step CFG-DDIM solver to the next milestone below,
t_n = t_m - T/M. `lcd` trains the same LoRA on these pairs with the global x0 consistency of eq. 10, by the
trainer stage 1 uses. One UNet serves as both models: the LoRA enabled is the student, disabled the teacher.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .config import PipelineConfig
from .consistency import open_lora, train_consistency_stage
from .lora import load_lora_into
from .models import Conditioning, Denoiser
from .progress import Reporter
from .schedule import NoiseSchedule, ddim, milestones
from .trajectories import fill_pair_shards, sample_seed, schedule_of


def student_clean_latents(x0_fn, x_T: torch.Tensor, q: int, schedule: NoiseSchedule,
                          renoise: str = "same", generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 2's q-step student sampler from z_T = eps: predict x0 at t, re-noise to t - T/q, repeat;
    the re-noising uses the same eps (`renoise="same"`, as the paper) or fresh noise (`"fresh"`)."""
    T = schedule.T
    timesteps = [int(round(T - 1 - i * T / q)) for i in range(q)]
    x, eps = x_T, x_T
    for i, t in enumerate(timesteps):
        x0 = x0_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if i + 1 == len(timesteps):
            return x0
        if renoise == "fresh":
            eps = torch.randn(x.shape, generator=generator).to(x)
        x = schedule.add_noise(x0, eps, timesteps[i + 1])
    return x


@torch.no_grad()
def teacher_solver(teacher: Denoiser, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, p: int,
                   cond: Conditioning, uncond: Conditioning, w: float) -> torch.Tensor:
    """The teacher's multistep solver: p CFG-DDIM steps from t_from to t_to (per sample), evenly spaced.
    p = 1 is one DDIM step."""
    t_prev = t_from
    for k in range(1, p + 1):
        t_next = (t_from.double() + (t_to.double() - t_from.double()) * k / p).round().long()
        x0, _ = teacher.guided(x, t_prev, cond, uncond, w)
        x = ddim(teacher.schedule, x, x0, t_prev, t_next)
        t_prev = t_next
    return x


def plan_lcd_samples(start: int, stop: int, *, base_seed: int, num_prompts: int, shape: tuple[int, int, int],
                     bounds: list[int]):
    """Per sample (from its own seed): the starting noise, the forward-diffusion noise and the milestone pair
    (t_m, t_n) with t_m drawn from the M upper milestones and t_n the next one below (eq. 9)."""
    idx = np.arange(start, stop)
    seeds = np.array([sample_seed(base_seed, int(i), domain="lcd") for i in idx], dtype=np.int64)
    asc = sorted(bounds)
    t_m, noise, eps = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        k = int(torch.randint(1, len(asc), (1,), generator=g))
        t_m.append(asc[k])
        noise.append(torch.randn(shape, generator=g))
        eps.append(torch.randn(shape, generator=g))
    t_m_t = torch.tensor(t_m)
    t_n = torch.tensor([asc[asc.index(t) - 1] for t in t_m])
    return idx, seeds, idx % num_prompts, t_m_t, t_n, torch.stack(noise), torch.stack(eps)


@contextmanager
def adapters_disabled(unet):
    """The teacher is the student's UNet with its LoRA switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@torch.no_grad()
def compute_lcd_shard(cfg: PipelineConfig, unet, schedule: NoiseSchedule, cond_all: Conditioning,
                      uncond: Conditioning, start: int, stop: int, shape: tuple[int, int, int]) -> dict:
    lc, sch = cfg.lcd_trajectories, cfg.schedule
    bounds = milestones(sch.num_train_timesteps, sch.segments)
    idx, seeds, pidx, t_m, t_n, noise, eps = plan_lcd_samples(start, stop, base_seed=cfg.compute.seed,
                                                              num_prompts=len(cond_all), shape=shape, bounds=bounds)
    device, dtype = unet.device, unet.dtype
    model = Denoiser(unet, schedule)
    x_hi, x_lo = torch.empty_like(noise), torch.empty_like(noise)
    unc = uncond.to(device, dtype)
    for i in range(0, len(idx), lc.batch_size):
        sl = slice(i, i + lc.batch_size)
        cond = cond_all[torch.from_numpy(pidx[sl])].to(device, dtype)
        # 1) clean latents from the stage-1 student, q steps (Algorithm 2)
        z0 = student_clean_latents(lambda x, t: model(x, t, cond)[0], noise[sl].to(device, dtype), lc.q, schedule,
                                   renoise=lc.renoise, generator=torch.Generator().manual_seed(int(seeds[i])))
        # 2) forward diffusion to the milestone t_m (eq. 9), z0 detached
        tm, tn = t_m[sl].to(device), t_n[sl].to(device)
        zt = schedule.add_noise(z0, eps[sl].to(device, dtype), tm)
        # 3) the teacher's p-step CFG-DDIM solver down to the next milestone
        with adapters_disabled(unet):
            zn = teacher_solver(model, zt, tm, tn, lc.p, cond, unc, sch.guidance)
        x_hi[sl], x_lo[sl] = zt.float().cpu(), zn.float().cpu()
    return {"x_hi": x_hi.numpy(), "x_lo": x_lo.numpy(), "t_hi": t_m.numpy().astype(np.int32),
            "t_lo": t_n.numpy().astype(np.int32), "t_step": t_n.numpy().astype(np.int32),
            "prompt_idx": pidx.astype(np.int32), "seed": seeds}


def run_lcd_trajectories(cfg: PipelineConfig, lora_art, art, reporter: Reporter,
                         shards: list[int] | None = None) -> dict:
    lc = cfg.lcd_trajectories

    def setup(pipe, cond_all, uncond):
        load_lora_into(pipe.unet, open_lora(cfg, lora_art.uri, lora_art.store), cfg.lora)
        schedule = schedule_of(pipe)
        return lambda start, stop, shape: compute_lcd_shard(cfg, pipe.unet, schedule, cond_all, uncond, start, stop,
                                                            shape)

    return fill_pair_shards(cfg, art, reporter, stage="lcd-trajectories", num_samples=lc.num_samples,
                            shard_size=lc.shard_size, storage_dtype=cfg.trajectories.storage_dtype, shards=shards,
                            setup=setup)


def run_lcd(cfg: PipelineConfig, pairs_art, init_art, out_art, reporter: Reporter, lpips_art=None) -> dict:
    """Stage `lcd`: eq. 10 on the milestone pairs, continuing the stage-1 LoRA; the teacher is not loaded."""
    return train_consistency_stage(cfg, cfg.lcd, name="lcd", pairs_art=pairs_art, out_art=out_art, loss="lcd",
                                   reporter=reporter, init_lora_uri=init_art.uri,
                                   lpips_uri=lpips_art.uri if lpips_art is not None else None)
