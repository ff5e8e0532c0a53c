"""Trajectory generation: samples/s of the `teacher-trajectories` stage vs a bare loop of the same teacher
forward passes (pipeline overhead = 1 - ratio; target < 10%).

    python bench/bench_trajectories.py [--samples 512] [--batch 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _toy import teacher_source
from common import report
from tlcm_core.config import load_config
from tlcm_core.models import Denoiser, encode_prompts, latent_shape, load_pipeline
from tlcm_core.pipeline import open_store, plan, run_stage
from tlcm_core.progress import SilentReporter
from tlcm_core.prompts import load_prompts
from tlcm_core.schedule import milestones, segment_index
from tlcm_core.models import schedule_of
from tlcm_core.stages.teacher_trajectories import plan_samples


def bare_loop(cfg, pipe) -> tuple[float, int]:
    """The stage's teacher work and nothing else: per segment group and batch, the MDS CFG steps + the jump."""
    prompts = load_prompts(cfg.trajectories.prompts)
    cond_all, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution)
    teacher = Denoiser(pipe.unet, schedule_of(pipe))
    bounds = milestones(1000, cfg.schedule.segments)
    shape = latent_shape(pipe, cfg.teacher.resolution)
    n, bs = cfg.trajectories.num_samples, cfg.trajectories.batch_size
    sp = plan_samples(0, n, base_seed=0, num_prompts=len(prompts), shape=shape, bounds=bounds, skip=20)
    seg = segment_index(sp.t_hi, bounds)
    evals, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, cfg.trajectories.shard_size):  # the stage works shard by shard
            s_seg = seg[start:start + cfg.trajectories.shard_size]
            for s in s_seg.unique().tolist():
                members = torch.nonzero(s_seg == s).flatten() + start
                for i in range(0, len(members), bs):
                    m = members[i:i + bs]
                    x, t = sp.noise[m], sp.t_hi[m]
                    cond = cond_all[torch.from_numpy(sp.prompt_idx[m.numpy()])]
                    for _ in range(cfg.schedule.segments - s + 1):  # L MDS steps + the jump
                        teacher.guided(x, t, cond, uncond, cfg.schedule.guidance)
                        evals += 2 * len(m)
    return time.perf_counter() - t0, evals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("toy", [f"teacher.source={teacher_source()}", f"store.url={tmp}",
                                  f"trajectories.num_samples={args.samples}", "trajectories.shard_size=128",
                                  f"trajectories.batch_size={args.batch}", "compute.device=cpu"])
        pipe = load_pipeline(cfg.teacher, torch.device("cpu"))
        bare_s, evals = bare_loop(cfg, pipe)
        t0 = time.perf_counter()
        load_pipeline(cfg.teacher, torch.device("cpu"))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_stage(cfg, "teacher-trajectories", open_store(cfg), SilentReporter(), p=plan(cfg))
        stage_s = time.perf_counter() - t0
    work_s = stage_s - load_s
    rows = [{"path": "bare teacher loop", "seconds": bare_s, "samples/s": args.samples / bare_s,
             "UNet evals/sample": evals / args.samples},
            {"path": "teacher-trajectories stage (excl. pipeline load)", "seconds": work_s,
             "samples/s": args.samples / work_s, "UNet evals/sample": evals / args.samples},
            {"path": "pipeline load (once per stage run)", "seconds": load_s, "samples/s": "", "UNet evals/sample": ""}]
    overhead = 1 - (args.samples / work_s) / (args.samples / bare_s)
    report("Trajectory generation: stage vs bare teacher loop", rows,
           notes=f"Pipeline overhead = 1 - ratio = {overhead:.1%} (target < 10%): text encoding, noise per sample, "
                 f"zarr writes, shard markers, commit with checksums. {args.samples} samples, batch {args.batch}.")


if __name__ == "__main__":
    main()
