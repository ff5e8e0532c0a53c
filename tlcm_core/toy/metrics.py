"""Toy-world measurements: sample a (teacher or student) toy pipeline and score it with the evaluator.

``measure_pipeline`` gives, per step count, prompt accuracy (every attribute right), per-attribute
accuracy and the Frechet distance on evaluator features against real images of the world.
"""

from __future__ import annotations

import time

import torch
from diffusers import DDIMScheduler

from .data import get_world
from .evaluator import ToyEvaluator, frechet_distance
from .pipeline import SDXL_SCHEDULE

__all__ = ["ddim_trailing_scheduler", "generate", "eval_prompts", "measure_pipeline"]


def ddim_trailing_scheduler() -> DDIMScheduler:
    """DDIM on the SDXL schedule with trailing spacing, from an explicit config (no inherited keys)."""
    return DDIMScheduler(
        **SDXL_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        thresholding=False,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=False,
    )


def eval_prompts(world: str = "toy", n: int = 256) -> list[str]:
    """``n`` prompts cycling over the world's prompts (balanced when n is a multiple of their count)."""
    ps = get_world(world).prompts()
    return [ps[i % len(ps)] for i in range(n)]


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 256,
             **call_kw) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), sampled with the pipeline itself (its current scheduler); `call_kw` go to the
    pipeline call (the toy flow teacher's `max_sequence_length`)."""
    out = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        g = torch.Generator().manual_seed(seed * 100_003 + b)
        res = pipe(
            prompt=prompts[i : i + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=g,
            output_type="pt",
            **call_kw,
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def measure_pipeline(
    pipe,
    evaluator: ToyEvaluator | None = None,
    world: str = "toy",
    steps: tuple[int, ...] = (1, 2, 4, 8, 25),
    n: int = 256,
    guidance_scale: float = 7.0,
    seed: int = 0,
    n_real: int = 1024,
    real_seed: int = 424_242,
) -> dict:
    """Sample ``n`` balanced prompts at each step count and score them (accuracy with its 95% Wilson interval,
    per-attribute accuracy, Frechet distance to ``n_real`` real images). An SDXL-shaped teacher samples with
    DDIM-trailing; the SD3-shaped flow teacher with its own scheduler (FlowMatchEulerDiscreteScheduler, shift 3), as
    its stock pipeline does."""
    from .flow_pipeline import MAX_SEQUENCE_LENGTH
    from ..evaluation import wilson_interval

    ev = evaluator if evaluator is not None else ToyEvaluator.load(world)
    w = get_world(world)
    real, real_prompts = w.sample(n_real, real_seed)
    real2, _ = w.sample(n, real_seed + 1)
    f_real = ev.features(real)
    old = pipe.scheduler
    flow = hasattr(pipe, "transformer")
    call_kw = {"max_sequence_length": MAX_SEQUENCE_LENGTH} if flow else {}
    if flow:
        sampler = f"{type(pipe).__name__} + its {type(old).__name__}(shift={old.config.shift:g})"
    else:
        pipe.scheduler = ddim_trailing_scheduler()
        sampler = f"{type(pipe).__name__} + DDIMScheduler(timestep_spacing='trailing', SDXL schedule)"
    prompts = eval_prompts(world, n)
    rows = {}
    try:
        for k in steps:
            t0 = time.time()
            imgs = generate(pipe, prompts, k, guidance_scale, seed, **call_kw)
            hits = ev.hits(imgs, prompts)
            right = int(ev.all_right(hits).sum())
            rows[str(k)] = {
                "accuracy": right / n,
                "accuracy_ci95": list(wilson_interval(right, n)),
                "attribute_accuracy": {a: float(v.float().mean()) for a, v in hits.items()},
                "fd": frechet_distance(ev.features(imgs), f_real),
                "sample_s": time.time() - t0,
            }
    finally:
        pipe.scheduler = old
    return {
        "world": world,
        "sampler": sampler,
        "guidance_scale": guidance_scale,
        "n": n,
        "seed": seed,
        "n_real": n_real,
        "real_accuracy": ev.attribute_accuracy(real, real_prompts),
        "fd_real_floor": frechet_distance(ev.features(real2), f_real),
        "steps": rows,
    }


@torch.no_grad()
def vae_reconstruction(pipe, evaluator: ToyEvaluator | None = None, world: str = "toy", n: int = 1024, seed: int = 31337) -> dict:
    """Evaluator accuracy and FD of VAE reconstructions (encode mean -> decode) of real images."""
    ev = evaluator if evaluator is not None else ToyEvaluator.load(world)
    w = get_world(world)
    x, prompts = w.sample(n, seed)
    vae = pipe.vae
    recs = []
    for i in range(0, n, 256):
        z = vae.encode(x[i : i + 256] * 2 - 1).latent_dist.mean
        recs.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    rec = torch.cat(recs)
    acc = ev.attribute_accuracy(rec, prompts)
    return {
        "n": n,
        "accuracy": acc["all"],
        "attribute_accuracy": {a: acc[a] for a in w.attributes},
        "mse": float((rec - x).pow(2).mean()),
        "fd_vs_originals": frechet_distance(ev.features(rec), ev.features(x)),
    }
