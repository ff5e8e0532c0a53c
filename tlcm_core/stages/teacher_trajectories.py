"""Stage `teacher-trajectories`: data-free MDS states and teacher CFG-DDIM targets (TLCM Algorithm 1, eq. 8),
cached as a pair artifact (layout in tlcm_core/pairs.py). Sharded: several workers can fill one artifact."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import PipelineConfig
from ..models import Conditioning, Denoiser, teacher_denoiser
from ..pairs import fill_pair_shards, sample_seed
from ..samplers import mds_states
from ..schedule import ddim, lower_boundary, milestones, segment_index
from ..stage import Stage, StageContext


@dataclass
class SamplePlan:
    """Everything random about samples [start, stop): drawn from their seeds, reproducible anywhere."""

    index: np.ndarray  # (n,) global sample indices
    seed: np.ndarray  # (n,) int64
    prompt_idx: np.ndarray  # (n,)
    t_hi: torch.Tensor
    t_lo: torch.Tensor
    t_step: torch.Tensor
    noise: torch.Tensor  # (n, C, h, w) x_T


def plan_samples(start: int, stop: int, *, base_seed: int, num_prompts: int, shape: tuple[int, int, int],
                 bounds: list[int], skip: int) -> SamplePlan:
    idx = np.arange(start, stop)
    seeds = np.array([sample_seed(base_seed, int(i)) for i in idx], dtype=np.int64)
    t_hi, noise = [], []
    top = max(bounds)
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        t_hi.append(int(torch.randint(1, top + 1, (1,), generator=g)))
        noise.append(torch.randn(shape, generator=g))
    t_hi_t = torch.tensor(t_hi, dtype=torch.long)
    t_step = lower_boundary(t_hi_t, bounds)
    t_lo = torch.maximum(t_hi_t - skip, t_step)  # clamped at the segment boundary (TLCM eq. 7)
    return SamplePlan(idx, seeds, idx % num_prompts, t_hi_t, t_lo, t_step, torch.stack(noise))


@torch.no_grad()
def compute_shard(cfg: PipelineConfig, teacher: Denoiser, cond_all: Conditioning, uncond: Conditioning,
                  start: int, stop: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The samples of one shard: MDS state x_hi and the teacher's CFG-DDIM jump x_lo (TLCM eq. 8)."""
    sch = cfg.schedule
    bounds = milestones(sch.num_train_timesteps, sch.segments)
    plan = plan_samples(start, stop, base_seed=cfg.compute.seed, num_prompts=len(cond_all), shape=shape,
                        bounds=bounds, skip=sch.skip)
    device = next(teacher.unet.parameters()).device
    dtype = next(teacher.unet.parameters()).dtype
    x_hi = torch.empty_like(plan.noise)
    x_lo = torch.empty_like(plan.noise)
    seg = segment_index(plan.t_hi, bounds)
    bs = cfg.trajectories.batch_size
    unc = uncond.to(device, dtype)
    for s in seg.unique().tolist():  # samples of one segment share their number of MDS steps
        members = torch.nonzero(seg == s).flatten()
        for i in range(0, len(members), bs):
            m = members[i:i + bs]
            cond = cond_all[torch.from_numpy(plan.prompt_idx[m.numpy()])].to(device, dtype)
            x_T = plan.noise[m].to(device, dtype)
            t_hi, t_lo = plan.t_hi[m].to(device), plan.t_lo[m].to(device)
            xh = mds_states(teacher, x_T, t_hi, bounds, cond, unc, sch.guidance, mds=cfg.trajectories.mds)
            x0, _ = teacher.guided(xh, t_hi, cond, unc, sch.guidance)
            xl = ddim(teacher.schedule, xh, x0, t_hi, t_lo)
            x_hi[m], x_lo[m] = xh.float().cpu(), xl.float().cpu()
    return {"x_hi": x_hi.numpy(), "x_lo": x_lo.numpy(), "t_hi": plan.t_hi.numpy().astype(np.int32),
            "t_lo": plan.t_lo.numpy().astype(np.int32), "t_step": plan.t_step.numpy().astype(np.int32),
            "prompt_idx": plan.prompt_idx.astype(np.int32), "seed": plan.seed}


def run(ctx: StageContext) -> dict:
    """Fill every missing shard (or only `ctx.shards`). The teacher is loaded once, and only if work is left."""
    cfg, t = ctx.cfg, ctx.cfg.trajectories

    def setup(pipe, cond_all, uncond):
        teacher = teacher_denoiser(pipe, cfg.teacher.resolution)
        return lambda start, stop, shape: compute_shard(cfg, teacher, cond_all, uncond, start, stop, shape)

    return fill_pair_shards(cfg, ctx.out, ctx.reporter, stage="teacher-trajectories", num_samples=t.num_samples,
                            shard_size=t.shard_size, storage_dtype=t.storage_dtype, shards=ctx.shards, setup=setup)


STAGE = Stage("teacher-trajectories", version=2, run=run,
              reads=("teacher", "schedule", "trajectories", "compute.seed", "compute.dtype", "compute.cpu_dtype"),
              uses=("trajectories.batch_size",),  # batching does not change the samples
              num_shards=lambda cfg: -(-cfg.trajectories.num_samples // cfg.trajectories.shard_size))
