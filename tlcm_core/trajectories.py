"""Stage `teacher-trajectories`: data-free MDS states and teacher CFG-DDIM targets, cached in zarr.

Layout of the artifact (all zarr v3 arrays, chunked along the sample axis by `shard_size`):
  cond/{prompt_embeds,pooled,time_ids}    per prompt (P rows), the text conditioning the teacher saw
  uncond/{prompt_embeds,pooled,time_ids}  one row: the unconditional used for CFG
  x_hi, x_lo        (N, C, h, w)  the MDS state at t_hi and one teacher CFG-DDIM jump to t_lo (TLCM eq. 8)
  t_hi, t_lo, t_step, prompt_idx  (N,) int32;   seed (N,) int64: the noise seed of each sample
Each shard (one chunk of rows) is computed from its samples' seeds alone and marked done when written, so
shards can run in parallel on several workers and a restart fills only what is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import PipelineConfig
from .models import Conditioning, Denoiser, encode_prompts, latent_shape
from .progress import Reporter
from .schedule import ddim, lower_boundary, milestones, segment_index

SAMPLE_ARRAYS = ("x_hi", "x_lo", "t_hi", "t_lo", "t_step", "prompt_idx", "seed")


def sample_seed(base_seed: int, index: int, domain: str = "teacher") -> int:
    """A stable 63-bit seed per sample (independent of shard size, worker and order); each stage that draws
    samples has its own domain so their randomness never coincides."""
    key = f"tlcm-sample:{base_seed}:{index}" if domain == "teacher" else f"tlcm-{domain}-sample:{base_seed}:{index}"
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


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
def mds_states(teacher: Denoiser, x_T: torch.Tensor, t_m: torch.Tensor, bounds: list[int], cond: Conditioning,
               uncond: Conditioning, w: float, mds: bool = True) -> torch.Tensor:
    """TLCM Algorithm 1 for a batch whose samples all lie in one segment s: L = M - s CFG-DDIM steps of size
    (T-1 - t_m)/L from pure noise at T-1 down to each sample's own t_m. `mds=False` takes one step instead."""
    top, M = max(bounds), len(bounds) - 1
    seg = segment_index(t_m, bounds)
    if not bool((seg == seg[0]).all()):
        raise ValueError("mds_states expects samples of one segment")
    L = (M - int(seg[0])) if mds else 1
    x = x_T
    t_prev = torch.full_like(t_m, top)
    for k in range(1, L + 1):
        t_next = (top + (t_m.double() - top) * k / L).round().long()
        active = t_next != t_prev  # samples already at t_m (t_m == top) stay put
        if bool(active.any()):
            x0, _ = teacher.guided(x, t_prev, cond, uncond, w)
            x = torch.where(active.reshape(-1, 1, 1, 1), ddim(teacher.schedule, x, x0, t_prev, t_next), x)
        t_prev = t_next
    return x


def encode_text_arrays(cfg: PipelineConfig, art, pipe, prompts: list[str]) -> None:
    """Encode every prompt once and store the conditioning (idempotent: skipped once marked done)."""
    if art.is_done("text"):
        return
    cond, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution, batch_size=cfg.trajectories.batch_size)
    rows = min(len(prompts), 1024)
    for prefix, c in (("cond", cond), ("uncond", uncond)):
        for name, t in c.tensors().items():
            t = t.float().cpu().numpy()
            arr = art.create_array(f"{prefix}/{name}", shape=t.shape, chunks=(min(rows, t.shape[0]),) + t.shape[1:],
                                   dtype="float32")  # no overwrite: concurrent shard runs write identical chunks
            arr[...] = t
    art.mark_done("text", {"num_prompts": len(prompts)})


def read_conditioning(art, prefix: str, rows=None) -> Conditioning:
    out = {}
    for name in ("prompt_embeds", "pooled", "time_ids"):
        if art.exists_file(f"{prefix}/{name}/zarr.json"):
            arr = art.open_array(f"{prefix}/{name}")
            data = arr[...] if rows is None else arr.get_orthogonal_selection((rows,))
            out[name] = torch.from_numpy(np.asarray(data))
    return Conditioning.from_tensors(out)


def create_sample_arrays(art, shape: tuple[int, int, int], num_samples: int, shard_size: int, storage_dtype: str):
    n, s = num_samples, shard_size
    arrays = {name: art.create_array(name, shape=(n, *shape), chunks=(s, *shape), dtype=storage_dtype)
              for name in ("x_hi", "x_lo")}
    for name in ("t_hi", "t_lo", "t_step", "prompt_idx"):
        arrays[name] = art.create_array(name, shape=(n,), chunks=(s,), dtype="int32")
    arrays["seed"] = art.create_array("seed", shape=(n,), chunks=(s,), dtype="int64")
    return arrays


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + shard_size, num_samples)) for i in range(0, num_samples, shard_size)]


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


ShardFn = Callable[[int, int, tuple[int, int, int]], dict[str, np.ndarray]]  # (start, stop, latent shape) -> arrays


def fill_pair_shards(cfg: PipelineConfig, art, reporter: Reporter, *, stage: str, num_samples: int,
                     shard_size: int, storage_dtype: str, shards: list[int] | None,
                     setup: Callable[[object, Conditioning, Conditioning], ShardFn],
                     device: torch.device | None = None) -> dict:
    """Shared by every pair-producing stage: text conditioning once, then every missing shard (or only
    `shards`), each written to its chunk-aligned rows and marked done. `setup(pipe, cond, uncond)` returns the
    function that computes one shard; the pipeline is loaded only if some shard is missing."""
    from .models import load_pipeline, resolve_device, resolve_dtype
    from .prompts import check_prompt_lengths, load_prompts

    device = device or resolve_device(cfg.compute)
    prompts = load_prompts(cfg.trajectories.prompts)
    ranges = shard_ranges(num_samples, shard_size)
    todo = [i for i in (shards if shards is not None else range(len(ranges))) if not art.is_done(f"shard-{i:05d}")]
    total = len(ranges)
    summary = {"num_samples": num_samples, "num_shards": total, "num_prompts": len(prompts)}
    if not todo and art.is_done("text"):  # every shard is there (e.g. filled by other workers): no model needed
        return {**summary, "latent_shape": list(art.open_array("x_hi").shape[1:])}
    check_prompt_lengths(prompts, cfg.teacher, source=cfg.trajectories.prompts)  # tokenizers only: before the teacher
    pipe = load_pipeline(cfg.teacher, device, resolve_dtype(cfg.compute, device))
    encode_text_arrays(cfg, art, pipe, prompts)
    shape = latent_shape(pipe, cfg.teacher.resolution)
    arrays = create_sample_arrays(art, shape, num_samples, shard_size, storage_dtype)
    compute = setup(pipe, read_conditioning(art, "cond"), read_conditioning(art, "uncond"))
    done = total - len(todo)
    reporter.progress(stage, done, total)
    for i in todo:
        start, stop = ranges[i]
        for name, values in compute(start, stop, shape).items():
            arrays[name][start:stop] = values.astype(arrays[name].dtype)
        art.mark_done(f"shard-{i:05d}", {"start": start, "stop": stop})
        done += 1
        reporter.progress(stage, done, total)
    return {**summary, "latent_shape": list(shape)}


def run_teacher_trajectories(cfg: PipelineConfig, art, reporter: Reporter, shards: list[int] | None = None,
                             device: torch.device | None = None) -> dict:
    """Stage `teacher-trajectories`: fill every missing shard (or only `shards`). The teacher is loaded once."""
    t = cfg.trajectories

    def setup(pipe, cond_all, uncond):
        teacher = Denoiser(pipe.unet, schedule_of(pipe))
        return lambda start, stop, shape: compute_shard(cfg, teacher, cond_all, uncond, start, stop, shape)

    return fill_pair_shards(cfg, art, reporter, stage="teacher-trajectories", num_samples=t.num_samples,
                            shard_size=t.shard_size, storage_dtype=t.storage_dtype, shards=shards, setup=setup,
                            device=device)


def schedule_of(pipe):
    from .schedule import NoiseSchedule

    return NoiseSchedule.from_config(dict(pipe.scheduler.config))
