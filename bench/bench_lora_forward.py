"""compute.lora_forward on a CPU: MLCD on toy-hard's pairs with PEFT's LoRA forward ("separate") against one op on
the adapted weight ("merged"), in one process with one thread and in the preset's two processes; the stage's wall
time, its training steps per second, and how far each LoRA is from the one-process separate one (the same function and
batches: only float rounding should differ).
The first run samples the teacher's pairs into DIR (about a minute); later runs reuse them.

    python bench/bench_lora_forward.py [--iterations 40] [--rank 64] [--samples 1024] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from common import report
from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "tlcm-bench-lora-forward"))
    args = ap.parse_args()
    base = ["compute.device=cpu", f"store.url={args.work_dir}", f"trajectories.num_samples={args.samples}",
            f"lora.rank={args.rank}", f"lora.alpha={args.rank}", f"mlcd.iterations={args.iterations}",
            f"mlcd.checkpoint_every={args.iterations + 1}", f"mlcd.log_every={args.iterations}"]
    run_pipeline(load_config("toy-hard", base), stages=["teacher-trajectories"], reporter=SilentReporter())
    rows, ref = [], None
    for procs, mode in ((1, "separate"), (1, "merged"), (2, "separate"), (2, "merged")):
        cfg = load_config("toy-hard", base + [f"compute.lora_forward={mode}", f"compute.cpu_processes={procs}",
                                              "compute.num_threads=1"])
        t0 = time.perf_counter()
        (res,) = run_pipeline(cfg, stages=["mlcd"], force=["mlcd"], reporter=SilentReporter())
        wall = time.perf_counter() - t0
        lora = open_store(cfg).artifact("mlcd", res.fingerprint).load_tensors("lora.safetensors")
        ref = ref or lora
        same = [r for r in rows if r["processes"] == procs]
        rows.append({"processes": procs, "lora_forward": mode, "stage wall, s": wall,
                     "steps/s": res.summary["steps_per_second"],
                     "speed-up over separate": res.summary["steps_per_second"] / same[0]["steps/s"] if same else 1.0,
                     "max |LoRA - 1 process, separate|": max(float((lora[k] - ref[k]).abs().max()) for k in ref),
                     "max |LoRA|": max(float(v.abs().max()) for v in ref.values())})
    report(f"compute.lora_forward on a CPU (toy-hard MLCD, rank {args.rank}, {args.iterations} steps at batch 32, "
           "one thread per process)", rows,
           notes=f"cpu count {os.cpu_count()}; torch {torch.__version__}; the stage's wall time includes loading "
                 "the UNet and starting the processes")


if __name__ == "__main__":
    main()
