"""The frozen pipelines' dtype on a CPU (`compute.cpu_dtype`): the toy-hard teacher's guided x0 prediction (CFG, one
batched forward pass of 2 x batch) and a 4-step DDIM + CFG sample, with float32 and bfloat16 weights loaded as the
trajectory and evaluation stages load them, and how far bfloat16's outputs are from float32's. A training step
(LoRA forward + backward) is timed under bfloat16 autocast too, for the record of why training stays float32.

    OMP_NUM_THREADS=1 python bench/bench_cpu_dtype.py [--batch 128] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

from common import report, timed
from tlcm_core.config import ComputeConfig, LoRAConfig, TeacherConfig
from tlcm_core.lora import attach_lora, lora_parameters
from tlcm_core.models import (Denoiser, cpu_has_native_bf16, encode_prompts, latent_shape, load_pipeline,
                              resolve_dtype, schedule_of)
from tlcm_core.samplers import teacher_sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cpu, teacher_cfg = torch.device("cpu"), TeacherConfig(source="toy:toy-hard", resolution=32)
    prompts = ["a red circle left of a blue square"] * args.batch
    x_T = torch.randn(args.batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch,), 749)
    rows, ref = [], {}
    for name in ("float32", "bfloat16"):
        dtype = resolve_dtype(ComputeConfig(cpu_dtype=name), cpu)
        pipe = load_pipeline(teacher_cfg, cpu, dtype)
        teacher = Denoiser(pipe.unet, schedule_of(pipe, 32))
        cond, uncond = encode_prompts(pipe, prompts, 32)
        cond, uncond, x = cond.to(cpu, dtype), uncond.to(cpu, dtype), x_T.to(dtype)
        with torch.no_grad():
            guided = timed(lambda: teacher.guided(x, t, cond, uncond, 7.0), args.repeats)
            x0 = teacher.guided(x, t, cond, uncond, 7.0)[0].float()
            sample = timed(lambda: teacher_sample(teacher, x, 4, cond, uncond, 7.0), args.repeats)
            z = teacher_sample(teacher, x, 4, cond, uncond, 7.0).float()
        ref.setdefault("x0", x0)
        ref.setdefault("z", z)
        rows.append({"weights": name, "guided x0, s": guided, "4-step DDIM + CFG, s": sample,
                     "speed-up": rows[0]["guided x0, s"] / guided if rows else 1.0,
                     "x0 rel. error": float((x0 - ref["x0"]).norm() / ref["x0"].norm()),
                     "4-step rel. error": float((z - ref["z"]).norm() / ref["z"].norm())})
    # training: the student's LoRA forward + backward on a batch of 32, float32 vs bfloat16 autocast
    pipe = load_pipeline(teacher_cfg, cpu, torch.float32)
    attach_lora(pipe.unet, LoRAConfig(rank=16, alpha=16))
    student = Denoiser(pipe.unet, schedule_of(pipe, 32))
    cond, _ = encode_prompts(pipe, prompts[:32], 32)
    xb, tb = x_T[:32], t[:32]

    def step(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x0, _ = student(xb, tb, cond)
        x0.float().square().mean().backward()
        for p in lora_parameters(pipe.unet):
            p.grad = None

    train = {ac: timed(lambda: step(ac), args.repeats) for ac in (False, True)}
    notes = (f"Batch {args.batch} (CFG: {2 * args.batch} rows per forward pass), best of {args.repeats}, latents "
             f"{tuple(latent_shape(pipe, 32))}; this CPU computes bfloat16 natively: {cpu_has_native_bf16()}. "
             f"Training step (LoRA rank 16, batch 32, forward + backward): float32 {train[False]:.3f} s, bfloat16 "
             f"autocast {train[True]:.3f} s — no gain, so the trainers stay float32.")
    report("Frozen-pipeline dtype on a CPU (`compute.cpu_dtype`)", rows, notes=notes)


if __name__ == "__main__":
    main()
