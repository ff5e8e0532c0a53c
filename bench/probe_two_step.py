"""Which of the 2-step sampler's two steps keeps the student from the teacher? (issue 16, criterion 2)

The TLCM sampler at 2 steps predicts x0 at t = 999, re-noises it to t = 499 with fresh noise and predicts x0 there.
This probe replaces either prediction by the teacher's own answer, the end of its CFG DDIM ODE from that state
(25 steps from 999, the teacher's 25-step sample; 13 steps of the same size from 499), and scores every combination
on the same prompts, starting noise and re-noising draws as `evaluate`:

    student, student   the sampler as users run it
    teacher, student   a perfect first step: how good is the student's second step?
    student, teacher   a perfect second step: how much did the student's first step already decide?
    teacher, teacher   the cost of re-noising itself (the teacher's sample, re-noised to 499, solved again)

    python bench/probe_two_step.py --config toy-hard --lora STORE/finetune/FP [--samples 1024] [--set K=V ...]
"""

from __future__ import annotations

import argparse

import torch

from _toy import probe_setup
from common import report
from tlcm_core.evaluation import Sampler, ToyMetrics, eval_noise
from tlcm_core.lora import read_lora
from tlcm_core.models import decode_latents, load_pipeline, teacher_denoiser
from tlcm_core.samplers import ddim_sample, student_x0_fn, teacher_x0_fn, tlcm_sample
from tlcm_core.schedule import ddim_timesteps

SECOND = 499  # the official 2-step grid: (999, 499)


def teacher_solve(teacher, cond, uncond, w: float, step: float = 999 / 25):
    """x0_fn: the end of the teacher's CFG DDIM ODE from (x, t), in steps of about `step` timesteps."""

    def x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = int(t[0])  # trailing DDIM steps from t0 down, as the teacher's own from 999
        ts = ddim_timesteps(max(1, round((t0 + 1) / step)), t0 + 1)
        return ddim_sample(teacher_x0_fn(teacher, cond, uncond, w), x, ts, teacher.schedule)

    return x0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", required=True, help="the student's LoRA (an mlcd/lcd/finetune artifact folder or a file)")
    args, cfg, device = probe_setup(ap)
    ev = cfg.evaluate
    student = Sampler(cfg, load_pipeline(cfg.teacher, device), read_lora(args.lora).state)
    teacher = teacher_denoiser(load_pipeline(cfg.teacher, device), cfg.teacher.resolution)
    metrics = ToyMetrics(cfg.teacher.toy_world, max(args.samples, 256), ev.seed)
    noise = eval_noise(args.samples, student.shape, ev.seed)
    dtype = student.denoiser.unet.dtype
    uncond = student.uncond.to(device, dtype)
    rows = []
    for first, second in (("student", "student"), ("teacher", "student"), ("student", "teacher"),
                          ("teacher", "teacher")):
        metrics.reset()
        for i in range(0, args.samples, ev.batch_size):
            idx = torch.arange(i, min(i + ev.batch_size, args.samples))
            pidx = idx % len(student.prompts)
            cond = student.cond[pidx].to(device, dtype)
            fns = {"student": student_x0_fn(student.denoiser, cond),
                   "teacher": teacher_solve(teacher, cond, uncond, cfg.schedule.guidance)}

            def x0_fn(x, t):
                return fns[first if int(t[0]) != SECOND else second](x, t)

            x0 = tlcm_sample(x0_fn, noise[idx].to(device, dtype), [999, SECOND], student.schedule,
                             generator=torch.Generator().manual_seed(ev.seed * 7 + i))
            metrics.update(decode_latents(student.pipe, x0).cpu(), [student.prompts[j] for j in pidx.tolist()])
        m = metrics.compute()
        rows.append({"x0 at 999": first, "x0 at 499": second, "accuracy": m["prompt_accuracy"],
                     "95% CI": m["accuracy_ci95"], "frechet": m["frechet"],
                     **{k: v for k, v in m.items() if k.startswith("acc_")}})
        print(rows[-1], flush=True)
    report("The 2-step sampler with the teacher's ODE in place of either step", rows,
           notes=f"student `{args.lora}`; {args.samples} samples per row, evaluate.seed {ev.seed}; the same starting "
                 "noise and re-noising draws in every row; the teacher's answer at t is its CFG DDIM solve from t "
                 "to 0 in steps of 40 timesteps.")


if __name__ == "__main__":
    main()
