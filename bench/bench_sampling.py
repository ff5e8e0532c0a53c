"""Sampling latency: the student's N-step TLCM sampler vs the teacher's 25-step DDIM + CFG, against the ideal
ratio of UNet evaluations (25 x 2 / N). Decoding is excluded (it is the same for both).

    python bench/bench_sampling.py [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from _toy import teacher_source
from common import report, timed
from tlcm_core.config import LoRAConfig, TeacherConfig
from tlcm_core.lora import attach_lora, merge_lora
from tlcm_core.models import Denoiser, encode_prompts, latent_shape, load_pipeline
from tlcm_core.samplers import ddim_sample, student_x0_fn, teacher_x0_fn, tlcm_sample
from tlcm_core.schedule import ddim_timesteps, milestones, sampler_timesteps
from tlcm_core.models import schedule_of


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pipe = load_pipeline(TeacherConfig(source=teacher_source(), resolution=32), torch.device("cpu"))
    sch = schedule_of(pipe)
    cond, uncond = encode_prompts(pipe, ["a red circle"] * args.batch, 32)
    x_T = torch.randn(args.batch, *latent_shape(pipe, 32))
    teacher = Denoiser(pipe.unet, sch)
    t_teacher = timed(lambda: ddim_sample(teacher_x0_fn(teacher, cond, uncond, 7.0), x_T, ddim_timesteps(25), sch),
                      args.repeats)
    attach_lora(pipe.unet, LoRAConfig(rank=16, alpha=16))  # the student carries its LoRA
    with torch.no_grad():  # a trained-looking LoRA (B != 0), so merging really changes the weights
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    student = student_x0_fn(Denoiser(pipe.unet, sch), cond)
    rows = [{"sampler": "teacher DDIM + CFG", "steps": 25, "ms/image": 1000 * t_teacher / args.batch,
             "speed-up": 1.0, "ideal (UNet evals)": 1.0}]
    for label, merge in (("LoRA unmerged (as in training)", False), ("LoRA merged (evaluate, generate)", True)):
        if merge:
            merge_lora(pipe.unet)
        for n in (1, 2, 3, 4, 8):
            ts = sampler_timesteps(n, milestones(1000, 8))
            t = timed(lambda: tlcm_sample(student, x_T, ts, sch, generator=torch.Generator().manual_seed(0)),
                      args.repeats)
            rows.append({"sampler": f"TLCM student, {label}", "steps": n, "ms/image": 1000 * t / args.batch,
                         "speed-up": t_teacher / t, "ideal (UNet evals)": 50 / n})
    report("Sampling latency: student N steps vs teacher 25 steps with CFG", rows,
           notes=f"batch {args.batch}, best of {args.repeats}; UNet only (VAE decode excluded); the same LoRA "
                 "unmerged (three matmuls per adapted layer) and merged into the weights (one).")


if __name__ == "__main__":
    main()
