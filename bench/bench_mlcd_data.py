"""MLCD training speed: steps/s with batches read from zarr (local folder, local S3 endpoint) vs the same
steps on in-memory tensors (target >= 0.95 with prefetching), side by side in one run.

    python bench/bench_mlcd_data.py [--steps 60] [--batch 64] [--rounds 3]

Each configuration is timed once per round, in an interleaved order, and the table shows the median over rounds:
slow drift of a shared machine's load then hits every row alike instead of whichever ran last.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import torch

from _s3 import moto_s3
from _toy import teacher_source
from common import report
from tlcm_core.config import load_config
from tlcm_core.consistency import mlcd_loss
from tlcm_core.losses import mse
from tlcm_core.lora import attach_lora, lora_parameters
from tlcm_core.models import Denoiser, load_schedule, load_unet
from tlcm_core.pipeline import open_store, plan, run_stage
from tlcm_core.progress import SilentReporter
from tlcm_core.store import ArtifactStore
from tlcm_core.pairs import PairBatches
from tlcm_core.training import make_optimizer


def steps_per_s(cfg, batches, steps: int) -> float:
    torch.manual_seed(0)
    unet = load_unet(cfg.teacher, torch.device("cpu"))
    attach_lora(unet, cfg.lora)
    unet.train()
    student = Denoiser(unet, load_schedule(cfg.teacher))
    opt = make_optimizer(lora_parameters(unet), cfg.mlcd)
    it = iter(batches)
    for _ in range(3):  # warm-up
        mlcd_loss(student, next(it), mse).backward()
    opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = mlcd_loss(student, next(it), mse)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as bucket:
        cfg = load_config("toy", [f"teacher.source={teacher_source()}", f"store.url={tmp}",
                                  f"trajectories.num_samples={args.samples}", "trajectories.shard_size=256",
                                  f"mlcd.batch_size={args.batch}", "compute.device=cpu"])
        p = plan(cfg)
        run_stage(cfg, "teacher-trajectories", open_store(cfg), SilentReporter(), p=p)
        local = open_store(cfg).artifact("teacher-trajectories", p["teacher-trajectories"].fingerprint)
        s3 = ArtifactStore(f"{bucket}/run")
        remote = s3.artifact("teacher-trajectories", local.fingerprint)
        s3.fs.put(local.uri.rstrip("/") + "/", remote.uri, recursive=True)
        remote.manifest(verify="checksum")  # the copy is complete
        need = args.steps + 3
        mem_batches = list(itertools.islice(PairBatches(local, args.batch, seed=0, prefetch=0).batches_from(0), need))
        configs = [("in-memory tensors", None, "-")] + [
            (name, art, prefetch) for name, art in (("zarr, local folder", local), ("zarr, S3 endpoint (moto)", remote))
            for prefetch in (0, 4)]
        timings: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        for r in range(args.rounds):
            order = list(range(len(configs)))
            order = order[r % len(order):] + order[:r % len(order)]  # rotate: no configuration always runs first
            for i in order:
                name, art, prefetch = configs[i]
                batches = mem_batches if art is None else \
                    PairBatches(art, args.batch, seed=0, prefetch=prefetch).batches_from(0)
                timings[i].append(steps_per_s(cfg, batches, args.steps))
        mem = statistics.median(timings[0])
        rows = [{"batches from": name, "prefetch": prefetch, "steps/s": statistics.median(timings[i]),
                 "ratio": statistics.median(timings[i]) / mem,
                 "spread": (max(timings[i]) - min(timings[i])) / statistics.median(timings[i])}
                for i, (name, _, prefetch) in enumerate(configs)]
    report("MLCD steps/s: zarr (local, S3) vs in-memory batches", rows,
           notes=f"batch {args.batch}, {args.steps} timed steps after 3 warm-up steps, median of {args.rounds} "
                 f"interleaved rounds (spread = (max - min) / median), toy UNet, LoRA rank "
                 f"{cfg.lora.rank}; target ratio >= 0.95 with prefetching.")


if __name__ == "__main__":
    main()
