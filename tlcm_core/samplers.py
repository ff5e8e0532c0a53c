"""Every sampler and solver of the method, each taking its model, the starting latent and its randomness as
arguments (k-diffusion style), so a cached target can be reproduced from a seed:

  mds_states            the teacher's multistep denoising strategy from pure noise (TLCM Algorithm 1)
  teacher_solver        the teacher's p-step CFG-DDIM solver between milestones (Algorithm 2)
  student_clean_latents the student's q-step sampler for clean latents (Algorithm 2)
  ddim_sample           deterministic DDIM (a DDPM-time teacher's reference sampler)
  euler_sample          the Euler steps of FlowMatchEulerDiscreteScheduler (a flow teacher's reference sampler)
  teacher_sample        the teacher's own baseline: DDIM + CFG on trailing timesteps, or Euler on its stock grid
  tlcm_sample           few-step sampling on milestone timesteps (the official inference sampler)
  tlcm_states           the same, one state at a time (what the model sees at each timestep)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, Literal

import torch

from .flow_schedule import SigmaGrid
from .models import Conditioning, Denoiser
from .schedule import NoiseSchedule, ddim, ddim_timesteps, segment_index

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
def euler_sample(velocity_fn: Callable[[torch.Tensor, int], torch.Tensor], x_T: torch.Tensor,
                 sigmas: torch.Tensor) -> torch.Tensor:
    """Euler through a flow grid (`sigmas`, noisiest first, ending with 0): x <- x + (sigma_next - sigma) v with
    v = velocity_fn(x, i) at the grid's i-th level; the float operations of FlowMatchEulerDiscreteScheduler.step
    (the latents upcast to float32 for the step, the result in the velocity's dtype). Returns the latents at 0."""
    x = x_T
    for i in range(len(sigmas) - 1):
        v = velocity_fn(x, i)
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    return x


@torch.no_grad()
def teacher_sample(teacher: Denoiser, x_T: torch.Tensor, steps: int, cond: Conditioning, uncond: Conditioning,
                   w: float, grid: SigmaGrid | None = None) -> torch.Tensor:
    """The teacher's own baseline sampler at `steps` steps with guidance `w`: for a DDPM-time teacher (grid None),
    DDIM with CFG on trailing integer timesteps; for a flow teacher, Euler on `grid` (its stock pipeline's shifted
    sigmas, `ModelFamily.euler_grid`) with the guidance its pipeline applies (FLUX.1-dev: the embedding; SD3: CFG
    when w > 1), as the stock pipeline samples it. Returns clean latents."""
    if grid is None:
        return ddim_sample(teacher_x0_fn(teacher, cond, uncond, w), x_T, ddim_timesteps(steps, teacher.schedule.T),
                           teacher.schedule)
    family, net = teacher.family, teacher.unet

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        return family.sampler_output(net, x, t, cond, uncond, w, grid)

    return euler_sample(velocity, x_T, grid.sigmas.to(x_T.device))


@torch.no_grad()
def tlcm_sample(x0_fn: X0Fn, x_T: torch.Tensor, timesteps: list[int], schedule: NoiseSchedule,
                mode: Literal["renoise", "multistep"] = "renoise", generator: torch.Generator | None = None,
                noises: list[torch.Tensor] | None = None) -> torch.Tensor:
    """TLCM few-step sampling on milestone timesteps.

    renoise   (official inference, LCM-style): predict x0, re-noise to the next timestep with fresh noise.
    multistep (the multistep-consistency form): a deterministic DDIM jump to the next milestone.
    Both end with the x0 predicted at the last timestep. Fresh noise comes from `generator` (or `noises`).
    """
    *_, x0 = tlcm_states(x0_fn, x_T, timesteps, schedule, mode, generator, noises)
    return x0


def tlcm_states(x0_fn: X0Fn, x_T: torch.Tensor, timesteps: list[int], schedule: NoiseSchedule,
                mode: Literal["renoise", "multistep"] = "renoise", generator: torch.Generator | None = None,
                noises: list[torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """`tlcm_sample` one state at a time: yields the state the model sees at each of `timesteps` (x_T first), then
    the sample. Each item after the first costs one model call, made when the caller asks for the item, so a caller
    that needs only the first k states (stage 3's inputs, DMD2's backward simulation) stops after k - 1 calls."""
    if mode not in ("renoise", "multistep"):
        raise ValueError(f"unknown sampler mode {mode!r}; use renoise or multistep")
    x = x_T
    for i, t in enumerate(timesteps):
        yield x
        x0 = x0_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if i + 1 == len(timesteps):
            yield x0
            return
        s = timesteps[i + 1]
        if mode == "renoise":
            eps = noises[i] if noises is not None else torch.randn(x.shape, generator=generator, device="cpu").to(x)
            x = schedule.add_noise(x0, eps, s)
        else:
            x = ddim(schedule, x, x0, t, s)


@torch.no_grad()
def mds_states(teacher: Denoiser, x_T: torch.Tensor, t_m: torch.Tensor, bounds: list[int], cond: Conditioning,
               uncond: Conditioning, w: float, mds: bool = True) -> torch.Tensor:
    """TLCM Algorithm 1 for a batch whose samples all lie in one segment s: L = M - s CFG-DDIM steps of size
    (T-1 - t_m)/L from pure noise at T-1 down to each sample's own t_m. `mds=False` takes one step instead."""
    top, M = max(bounds), len(bounds) - 1
    seg = segment_index(t_m, bounds)
    if not bool((seg == seg[0]).all()):
        raise ValueError("mds_states expects samples of one segment")
    L = (M - int(seg[0])) if mds else 1
    x = x_T
    t_prev = torch.full_like(t_m, top)
    for k in range(1, L + 1):
        t_next = (top + (t_m.double() - top) * k / L).round().long()
        active = t_next != t_prev  # samples already at t_m (t_m == top) stay put
        if bool(active.any()):
            x0, _ = teacher.guided(x, t_prev, cond, uncond, w)
            x = torch.where(active.reshape(-1, 1, 1, 1), ddim(teacher.schedule, x, x0, t_prev, t_next), x)
        t_prev = t_next
    return x


def student_clean_latents(x0_fn, x_T: torch.Tensor, q: int, schedule: NoiseSchedule,
                          renoise: str = "same", generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 2's q-step student sampler from z_T = eps: predict x0 at t, re-noise to t - T/q, repeat;
    the re-noising uses the same eps (`renoise="same"`, as the paper) or fresh noise (`"fresh"`)."""
    T = schedule.T
    timesteps = [int(round(T - 1 - i * T / q)) for i in range(q)]
    x, eps = x_T, x_T
    for i, t in enumerate(timesteps):
        x0 = x0_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if i + 1 == len(timesteps):
            return x0
        if renoise == "fresh":
            eps = torch.randn(x.shape, generator=generator).to(x)
        x = schedule.add_noise(x0, eps, timesteps[i + 1])
    return x


@torch.no_grad()
def teacher_solver(teacher: Denoiser, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, p: int,
                   cond: Conditioning, uncond: Conditioning, w: float) -> torch.Tensor:
    """The teacher's multistep solver: p CFG-DDIM steps from t_from to t_to (per sample), evenly spaced.
    p = 1 is one DDIM step."""
    t_prev = t_from
    for k in range(1, p + 1):
        t_next = (t_from.double() + (t_to.double() - t_from.double()) * k / p).round().long()
        x0, _ = teacher.guided(x, t_prev, cond, uncond, w)
        x = ddim(teacher.schedule, x, x0, t_prev, t_next)
        t_prev = t_next
    return x
