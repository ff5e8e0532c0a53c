"""How far is each LoRA's one step from pure noise from the teacher's map from noise to image? (issue 16)

The few-step sampler starts with the student's x0 prediction at the top timestep (t = 999) from pure noise x_T. The
teacher's answer for that same x_T is the end of its own sampler (DDIM + CFG, 25 steps). For N noises and prompts
(prompts in turn, as `evaluate`), this probe compares the two in latent space, per LoRA:

    mse        mean squared difference per latent element
    var        the variance of the prediction's latents (the teacher's samples' in the `teacher samples` row)
    cos        the cosine between prediction and teacher sample, each centred on its own mean over the N samples
               (1: the same direction away from the average image; 0: unrelated)

With `--pairs` (a finetune artifact's regression_pairs.safetensors) each LoRA is also compared on the first N of the
pool's own noises, against the pool's teacher samples (columns `*_pool`): a LoRA trained on that pool that fits its
noises (cos_pool) much better than fresh ones (cos) has learnt the pairs, not the map.

    python bench/probe_first_step.py --config toy-hard --lora STORE/mlcd/FP --lora STORE/finetune/FP [--samples 512]
        [--pairs STORE/finetune/FP/regression_pairs.safetensors]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _toy import probe_setup
from common import report
from tlcm_core.evaluation import Sampler, eval_noise
from tlcm_core.lora import read_lora
from tlcm_core.models import load_pipeline, teacher_grid
from tlcm_core.samplers import teacher_sample


def compare(x0: torch.Tensor, target: torch.Tensor, suffix: str = "") -> dict:
    a, b = ((x - x.mean(0)).flatten(1) for x in (x0, target))
    return {"mse" + suffix: round(F.mse_loss(x0, target).item(), 4), "var" + suffix: round(x0.var().item(), 4),
            "cos" + suffix: round(F.cosine_similarity(a, b).mean().item(), 3)}


@torch.no_grad()
def per_batch(sampler: Sampler, noise: torch.Tensor, batch_size: int, fn,
              prompt_idx: torch.Tensor | None = None) -> torch.Tensor:
    """fn(x, cond) on the noises in batches, with prompt_idx's prompts (default: prompts in turn, as `evaluate`);
    the latents, float32 on the CPU."""
    out, dtype = [], sampler.denoiser.unet.dtype
    if prompt_idx is None:
        prompt_idx = torch.arange(len(noise)) % len(sampler.prompts)
    for i in range(0, len(noise), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(noise)))
        cond = sampler.cond[prompt_idx[idx]].to(sampler.device, dtype)
        out.append(fn(noise[idx].to(sampler.device, dtype), cond).float().cpu())
    return torch.cat(out)


def first_steps(sampler: Sampler, noise: torch.Tensor, batch_size: int, top: int, w: float,
                prompt_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The network's x0 at `top` from each noise: the student's first step (no guidance: it is distilled into the
    LoRA), or the teacher's with CFG at `w` (the first step of its own sampler)."""
    d, uncond = sampler.denoiser, sampler.uncond.to(sampler.device, sampler.denoiser.unet.dtype)

    def x0(x: torch.Tensor, cond) -> torch.Tensor:
        t = torch.full((len(x),), top, device=x.device)
        return d(x, t, cond)[0] if sampler.student else d.guided(x, t, cond, uncond, w)[0]

    return per_batch(sampler, noise, batch_size, x0, prompt_idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", action="append", required=True, help="a LoRA (artifact folder or file); repeatable")
    ap.add_argument("--teacher-steps", type=int, default=25)
    ap.add_argument("--pairs", help="a regression_pairs.safetensors: also compare on its first --samples noises")
    args, cfg, device = probe_setup(ap)
    ev = cfg.evaluate
    teacher = Sampler(cfg, load_pipeline(cfg.teacher, device), None)
    top = teacher.milestones(1)[0]  # every sampler's first timestep
    noise = eval_noise(args.samples, teacher.shape, ev.seed)
    uncond = teacher.uncond.to(device, teacher.denoiser.unet.dtype)
    grid = teacher_grid(teacher.pipe, cfg.teacher.resolution, args.teacher_steps)
    samples = per_batch(teacher, noise, ev.batch_size, lambda x, cond: teacher_sample(
        teacher.denoiser, x, args.teacher_steps, cond, uncond, cfg.schedule.guidance, grid))
    rows = [{"x0 from pure noise": f"teacher samples ({args.teacher_steps} steps)", "mse": 0.0,
             "var": round(samples.var().item(), 4), "cos": 1.0},
            {"x0 from pure noise": "teacher, one step", **compare(first_steps(teacher, noise, ev.batch_size, top,
                                                                               cfg.schedule.guidance), samples)}]
    pool = {k: v[:args.samples] for k, v in load_file(args.pairs).items()} if args.pairs else None
    for path in args.lora:
        student = Sampler(cfg, load_pipeline(cfg.teacher, device), read_lora(path).state)
        rows.append({"x0 from pure noise": f"`{path}`", **compare(first_steps(student, noise, ev.batch_size, top,
                                                                               cfg.schedule.guidance), samples)})
        if pool is not None:
            rows[-1].update(compare(first_steps(student, pool["noise"], ev.batch_size, top, cfg.schedule.guidance,
                                                pool["prompt_idx"]), pool["latents"], "_pool"))
        print(rows[-1], flush=True)
    report("The student's first step against the teacher's samples from the same noise", rows,
           columns=list(dict.fromkeys(k for r in rows for k in r)),  # the teacher's rows have no `*_pool` columns
           notes=f"config {cfg.name}; {args.samples} noises (evaluate.seed {ev.seed}), prompts in turn; latents "
                 f"compared at t = {top}; the teacher's samples by DDIM + CFG {cfg.schedule.guidance}"
                 + (f"; `*_pool`: the first {args.samples} noises of `{args.pairs}`" if pool else "") + ".")


if __name__ == "__main__":
    main()
