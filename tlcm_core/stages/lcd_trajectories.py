"""Stage `lcd-trajectories` (TLCM Algorithm 2, eq. 9): clean latents from the stage-1 student with a q-step
sampler, forward diffusion to a milestone t_m, and the teacher's p-step CFG-DDIM solver to the next milestone
below, t_n = t_m - T/M; cached as a pair artifact (tlcm_core/pairs.py) that the `lcd` stage trains on. One network
serves as both models: the LoRA enabled is the student, disabled the teacher. Sharded like teacher-trajectories.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import PipelineConfig
from ..lora import adapters_disabled, load_lora_into, read_lora, set_lora_forward
from ..models import Conditioning, Denoiser, network_of, schedule_of, teacher_identity
from ..pairs import fill_pair_shards, sample_seed
from ..samplers import student_clean_latents, teacher_solver
from ..flow_schedule import FlowSchedule
from ..schedule import NoiseSchedule, milestones
from ..stage import Stage, StageContext


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


@torch.no_grad()
def compute_lcd_shard(cfg: PipelineConfig, unet, schedule: NoiseSchedule | FlowSchedule, cond_all: Conditioning,
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


def run(ctx: StageContext) -> dict:
    cfg, lc = ctx.cfg, ctx.cfg.lcd_trajectories
    student = read_lora(ctx.inputs["lora"], cfg.lora, teacher_identity(cfg.teacher))

    def setup(pipe, cond_all, uncond):
        net = network_of(pipe)
        load_lora_into(net, student.state, cfg.lora)
        set_lora_forward(net, cfg.compute.lora_forward)
        schedule = schedule_of(pipe, cfg.teacher.resolution)
        return lambda start, stop, shape: compute_lcd_shard(cfg, net, schedule, cond_all, uncond, start, stop, shape)

    return fill_pair_shards(cfg, ctx.out, ctx.reporter, stage="lcd-trajectories", num_samples=lc.num_samples,
                            shard_size=lc.shard_size, storage_dtype=cfg.trajectories.storage_dtype,
                            shards=ctx.shards, setup=setup)


STAGE = Stage("lcd-trajectories", version=2, run=run,
              reads=("teacher", "schedule", "lcd_trajectories", "trajectories.prompts", "trajectories.storage_dtype",
                     "lora", "compute.seed", "compute.dtype", "compute.cpu_dtype", "compute.lora_forward"),
              uses=("lcd_trajectories.batch_size", "trajectories.batch_size"), inputs=lambda cfg: {"lora": "mlcd"},
              num_shards=lambda cfg: -(-cfg.lcd_trajectories.num_samples // cfg.lcd_trajectories.shard_size))
