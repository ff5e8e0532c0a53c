"""Cached vs online teacher: the cost of one MLCD step when x_hi/x_lo come from the trajectory cache vs computed
in the loop (MDS + the CFG jump), in UNet forward-equivalents and seconds, with the peak memory of each.
Each path runs in its own process so peak RSS is its own.

    python bench/bench_cached_vs_online.py [--steps 20] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def child(mode: str, tmp: str, source: str, steps: int, batch: int) -> dict:
    sys.path.insert(0, str(HERE))
    from common import peak_rss_mb
    from tlcm_core.config import load_config
    from tlcm_core.consistency import mlcd_loss
    from tlcm_core.losses import mse
    from tlcm_core.lora import attach_lora, lora_parameters
    from tlcm_core.models import Denoiser, encode_prompts, load_pipeline, load_schedule, load_unet
    from tlcm_core.pipeline import open_store, plan
    from tlcm_core.prompts import load_prompts
    from tlcm_core.pairs import Batch, PairBatches
    from tlcm_core.training import make_optimizer
    from tlcm_core.models import schedule_of
    from tlcm_core.stages.teacher_trajectories import compute_shard

    cfg = load_config("toy", [f"teacher.source={source}", f"store.url={tmp}", "trajectories.num_samples=512",
                              "trajectories.shard_size=128", f"mlcd.batch_size={batch}", "compute.device=cpu"])
    torch.manual_seed(0)
    unet = load_unet(cfg.teacher, torch.device("cpu"))
    attach_lora(unet, cfg.lora)
    unet.train()
    student = Denoiser(unet, load_schedule(cfg.teacher))
    opt = make_optimizer(lora_parameters(unet), cfg.mlcd)
    if mode == "cached":
        art = open_store(cfg).artifact("teacher-trajectories", plan(cfg)["teacher-trajectories"].fingerprint)
        it = PairBatches(art, batch, seed=0, prefetch=4).batches_from(0)
        next_batch = lambda i: next(it)  # noqa: E731
    else:  # the teacher in the loop: a second full pipeline in memory, MDS + jump per batch
        pipe = load_pipeline(cfg.teacher, torch.device("cpu"))
        prompts = load_prompts("toy")
        cond_all, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution)
        teacher = Denoiser(pipe.unet, schedule_of(pipe))

        def next_batch(i):
            out = compute_shard(cfg.model_copy(update={"trajectories": cfg.trajectories.model_copy(
                update={"batch_size": batch})}), teacher, cond_all, uncond, i * batch, (i + 1) * batch, (4, 16, 16))
            t = {k: torch.from_numpy(v) for k, v in out.items()}
            return Batch(t["x_hi"], t["x_lo"], t["t_hi"].long(), t["t_lo"].long(), t["t_step"].long(),
                         cond_all[t["prompt_idx"].long()])
    for i in range(2):
        mlcd_loss(student, next_batch(i), mse).backward()
    opt.zero_grad()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = mlcd_loss(student, next_batch(i + 2), mse)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"seconds_per_step": (time.perf_counter() - t0) / steps, "peak_rss_mb": peak_rss_mb()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", default=None)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--source", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tmp, args.source, args.steps, args.batch)))
        return
    sys.path.insert(0, str(HERE))
    from _toy import teacher_source
    from common import report
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import open_store, plan, run_stage
    from tlcm_core.progress import SilentReporter
    from tlcm_core.schedule import milestones

    src = teacher_source()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("toy", [f"teacher.source={src}", f"store.url={tmp}", "trajectories.num_samples=512",
                                  "trajectories.shard_size=128", "compute.device=cpu"])
        run_stage(cfg, "teacher-trajectories", open_store(cfg), SilentReporter(), p=plan(cfg))
        res = {}
        for mode in ("cached", "online"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--tmp", tmp, "--source", src,
                                  "--steps", str(args.steps), "--batch", str(args.batch)], capture_output=True,
                                 text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    M = cfg.schedule.segments
    mean_L = sum(M - s for s in range(M)) / M  # MDS steps, averaged over segments (uniform t)
    # forward-equivalents per sample: a backward ~ 2 forwards; the student's grad pass = 3, its target pass = 1;
    # the online teacher adds (L + 1) CFG evaluations of 2 forwards each
    cached_fe = 3 + 1
    online_fe = cached_fe + 2 * (mean_L + 1)
    rows = [{"teacher targets": "cached (this pipeline)", "UNet fwd-equiv/sample": cached_fe,
             "s/step": res["cached"]["seconds_per_step"], "peak RSS MB": res["cached"]["peak_rss_mb"]},
            {"teacher targets": "online (teacher in the loop)", "UNet fwd-equiv/sample": online_fe,
             "s/step": res["online"]["seconds_per_step"], "peak RSS MB": res["online"]["peak_rss_mb"]}]
    report("Cached vs online teacher, per MLCD step", rows,
           notes=f"batch {args.batch}, M = {M} (mean MDS steps {mean_L:.1f}); measured speed-up "
                 f"{res['online']['seconds_per_step'] / res['cached']['seconds_per_step']:.2f}x, ideal "
                 f"{online_fe / cached_fe:.2f}x from the forward counts. Milestones {milestones(1000, M)}.")


if __name__ == "__main__":
    main()
