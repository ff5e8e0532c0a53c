"""Samplers. Each takes a denoiser, the starting noise and its randomness as arguments (k-diffusion style)."""

from __future__ import annotations

from typing import Callable, Literal

import torch

from .models import Conditioning, Denoiser
from .schedule import NoiseSchedule, ddim

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> x0


def teacher_x0_fn(teacher: Denoiser, cond: Conditioning, uncond: Conditioning | None, w: float) -> X0Fn:
    """The teacher's guided x0 prediction (CFG, TLCM eq. 8); w = 1 or uncond None means no guidance."""
    if uncond is None or w == 1.0:
        return lambda x, t: teacher(x, t, cond)[0]
    return lambda x, t: teacher.guided(x, t, cond, uncond, w)[0]


def student_x0_fn(student: Denoiser, cond: Conditioning) -> X0Fn:
    """The distilled student predicts x0 directly; guidance is distilled into it (guidance 0 at inference)."""
    return lambda x, t: student(x, t, cond)[0]


@torch.no_grad()
def ddim_sample(x0_fn: X0Fn, x_T: torch.Tensor, timesteps: list[int], schedule: NoiseSchedule,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM through `timesteps` (descending) and then to a clean x0 estimate."""
    x = x_T
    for i, t in enumerate(timesteps):
        x0 = x0_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if i + 1 < len(timesteps):
            x = ddim(schedule, x, x0, t, timesteps[i + 1])
        if callback is not None:
            callback(i, x0)
    return x0


@torch.no_grad()
def tlcm_sample(x0_fn: X0Fn, x_T: torch.Tensor, timesteps: list[int], schedule: NoiseSchedule,
                mode: Literal["renoise", "multistep"] = "renoise", generator: torch.Generator | None = None,
                noises: list[torch.Tensor] | None = None) -> torch.Tensor:
    """TLCM few-step sampling on milestone timesteps.

    renoise   (official inference, LCM-style): predict x0, re-noise to the next timestep with fresh noise.
    multistep (the multistep-consistency form): a deterministic DDIM jump to the next milestone.
    Both end with the x0 predicted at the last timestep. Fresh noise comes from `generator` (or `noises`).
    """
    x = x_T
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = x0_fn(x, tt)
        if i + 1 == len(timesteps):
            return x0
        s = timesteps[i + 1]
        if mode == "renoise":
            eps = noises[i] if noises is not None else torch.randn(x.shape, generator=generator, device="cpu").to(x)
            x = schedule.add_noise(x0, eps, s)
        elif mode == "multistep":
            x = ddim(schedule, x, x0, t, s)
        else:
            raise ValueError(f"unknown sampler mode {mode!r}; use renoise or multistep")
    return x
