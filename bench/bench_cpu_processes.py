"""A stage on a CPU: one process with one or two threads, against `compute.cpu_processes`.

--stage mlcd (default): MLCD on toy-hard's pairs at the preset's LoRA rank and batch, data-parallel processes each
with 1/N of every batch; the stage's wall time (model load, process start and the loop) and its training steps per
second, and how far each LoRA is from the one-process, one-thread LoRA (the same batches: only float rounding should
differ). The first run samples the teacher's pairs into DIR (about a minute); later runs reuse them.

--stage teacher-trajectories: the sampling stage itself, its shards filled by N local processes; the stage's wall
time and how far its pairs are from the one-process, one-thread pairs (each shard from its own seeds: none).

    python bench/bench_cpu_processes.py [--stage mlcd|teacher-trajectories] [--iterations 40] [--samples 1024]
                                        [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from _toy import mlcd_overrides, run_mlcd
from common import report
from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter

SETTINGS = (("1 process, 1 thread", ["compute.cpu_processes=1", "compute.num_threads=1"]),
            ("1 process, 2 threads", ["compute.cpu_processes=1", "compute.num_threads=2"]),
            ("2 processes (cpu_processes=2), 1 thread each", ["compute.cpu_processes=2"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=("mlcd", "teacher-trajectories"), default="mlcd")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "tlcm-bench-cpu-processes"))
    args = ap.parse_args()
    base = mlcd_overrides(args.work_dir, args.samples, args.iterations)
    if args.stage == "teacher-trajectories":
        return bench_sampling(args, base)
    run_pipeline(load_config("toy-hard", base), stages=["teacher-trajectories"], reporter=SilentReporter())
    rows, ref = [], None
    for name, overrides in SETTINGS:
        m, lora = run_mlcd(base + overrides, ref)
        ref = ref or lora
        rows.append({"setting": name, "stage wall, s": m["stage wall, s"], "steps/s": m["steps/s"],
                     "speed-up (steps/s)": m["steps/s"] / rows[0]["steps/s"] if rows else 1.0,
                     "max |LoRA - 1 process|": m["max |LoRA - ref|"], "max |LoRA|": m["max |LoRA|"]})
    report(f"A training stage on a CPU: threads against processes (toy-hard MLCD, {args.iterations} steps at batch "
           f"32, LoRA rank 64)", rows,
           notes=f"cpu count {os.cpu_count()}; torch {torch.__version__}; the stage's wall time includes loading the "
                 "UNet (and, with processes, starting them)")


def bench_sampling(args, base: list[str]) -> None:
    rows, ref = [], None
    for name, overrides in SETTINGS:
        cfg = load_config("toy-hard", base + overrides)
        t0 = time.perf_counter()
        (res,) = run_pipeline(cfg, stages=["teacher-trajectories"], force=["teacher-trajectories"],
                              reporter=SilentReporter())
        wall = time.perf_counter() - t0
        x_lo = open_store(cfg).artifact("teacher-trajectories", res.fingerprint).open_array("x_lo")[:]
        ref = x_lo if ref is None else ref
        rows.append({"setting": name, "stage wall, s": wall, "speed-up": rows[0]["stage wall, s"] / wall if rows
                     else 1.0, "max |x_lo - 1 process|": float(abs(x_lo - ref).max())})
    from tlcm_core.models import cpu_dtype_name

    cfg = load_config("toy-hard", base)
    report(f"A sampling stage on a CPU: threads against local processes (toy-hard teacher-trajectories, "
           f"{args.samples} samples in shards of {cfg.trajectories.shard_size}, {cpu_dtype_name(cfg.compute)} weights)",
           rows, notes=f"cpu count {os.cpu_count()}; torch {torch.__version__}; the stage's wall time includes "
                       "loading the teacher (in each process) and encoding the prompts")


if __name__ == "__main__":
    main()
