"""The math of TLCM in discrete DDPM time (docs/method.md).

Notation: `a_t = sqrt(alpha_bar_t)`, `s_t = sqrt(1 - alpha_bar_t)`, timesteps are integers in [0, T).
Everything here is plain tensor math: no models, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclass(frozen=True)
class NoiseSchedule:
    """The teacher's own noise schedule: alpha_bar_t for t = 0..T-1 and what the model predicts."""

    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: PredictionType = "epsilon"

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """From a diffusers scheduler config (beta_start/end, beta_schedule, num_train_timesteps, prediction_type)."""
        T = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, T, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}; supported: scaled_linear, linear, trained_betas")
        pred = config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {pred!r}")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("zero-terminal-SNR schedules are not supported yet (rescale_betas_zero_snr=True)")
        return cls(torch.cumprod(1.0 - betas, 0), pred)

    @property
    def T(self) -> int:
        return self.alphas_cumprod.shape[0]

    def coeffs(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) shaped to broadcast against `like` (B, C, H, W), in like's dtype/device."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        ab = self.alphas_cumprod[t.cpu()] if t.device != self.alphas_cumprod.device else self.alphas_cumprod[t]
        ab = ab.to(device=like.device, dtype=torch.float64)
        shape = (-1,) + (1,) * (like.ndim - 1) if ab.ndim else ()
        a, s = ab.sqrt().reshape(shape), (1 - ab).sqrt().reshape(shape)
        return a.to(like.dtype), s.to(like.dtype)

    def to_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a raw model output to (x0, eps) for any prediction type."""
        a, s = self.coeffs(t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - s * eps) / a
        elif self.prediction_type == "v_prediction":
            # v = a*eps - s*x0  =>  x0 = a*x_t - s*v,  eps = s*x_t + a*v
            x0 = a * x_t - s * model_output
            eps = s * x_t + a * model_output
        else:  # "sample"
            x0 = model_output
            eps = (x_t - a * x0) / s
        return x0, eps

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Forward diffusion q(x_t | x0) with given noise (TLCM eq. 9)."""
        a, s = self.coeffs(t, x0)
        return a * x0 + s * eps


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, TLCM eq. 8: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def ddim(schedule: NoiseSchedule, x_t: torch.Tensor, x0: torch.Tensor, t, s) -> torch.Tensor:
    """DDIM(z_t, x0, t, s) = a_s x0 + s_s (z_t - a_t x0) / s_t  (docs/method.md notation, eta = 0).

    At s == t this is the identity (returned exactly); s may be a tensor of per-sample targets.
    """
    a_t, s_t = schedule.coeffs(t, x_t)
    a_s, s_s = schedule.coeffs(s, x_t)
    eps = (x_t - a_t * x0) / s_t
    out = a_s * x0 + s_s * eps
    same = torch.as_tensor(t, device=x_t.device) == torch.as_tensor(s, device=x_t.device)
    if same.ndim:
        same = same.reshape((-1,) + (1,) * (x_t.ndim - 1))
    return torch.where(same, x_t, out)


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, model_output: torch.Tensor, t, s) -> torch.Tensor:
    """One deterministic DDIM step t -> s from a raw model output (eps or v)."""
    x0, eps = schedule.to_x0_eps(model_output, x_t, t)
    a_s, s_s = schedule.coeffs(s, x_t)
    return a_s * x0 + s_s * eps


# ---------------------------------------------------------------------------------------------------------------------
# Milestones, segments and timestep plans


def milestones(T: int = 1000, M: int = 8) -> list[int]:
    """Segment boundaries, descending: floor(linspace(T-1, 0, M+1)) -> 999, 874, ..., 124, 0 for T=1000, M=8.

    These are the teacher timesteps the official TLCM sampler uses.
    """
    return [int(v) for v in torch.linspace(T - 1, 0, M + 1, dtype=torch.float64).floor().tolist()]


def segment_index(t: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Segment s (0 = lowest t) with bounds_asc[s] < t <= bounds_asc[s+1]; t = 0 counts in segment 0."""
    asc = torch.tensor(sorted(bounds), device=t.device)
    return (torch.searchsorted(asc, t.long(), right=False) - 1).clamp(min=0)


def lower_boundary(t: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """t_step(t): the lower boundary of the segment t lies in (the student's jump target, TLCM eq. 7)."""
    asc = torch.tensor(sorted(bounds), device=t.device)
    return asc[segment_index(t, bounds)]


def mds_plan(t_m: int, bounds: list[int]) -> list[int]:
    """Multistep denoising strategy (TLCM Algorithm 1): teacher timesteps from T-1 down to t_m.

    A sample whose t_m lies in segment s (s = 0 for the lowest t) takes L = M - s CFG-DDIM steps of size
    (T-1 - t_m)/L, so states at smaller t come from more, smaller teacher steps (cleaner states).
    Returns the visited timesteps, starting at T-1 and ending at t_m (length L+1, or [T-1] if t_m = T-1).
    """
    top, M = max(bounds), len(bounds) - 1
    if not 0 <= t_m <= top:
        raise ValueError(f"t_m={t_m} outside [0, {top}]")
    if t_m == top:
        return [top]
    s = int(segment_index(torch.tensor([t_m]), bounds)[0])
    L = M - s
    pts = torch.linspace(top, t_m, L + 1, dtype=torch.float64).round().long().tolist()
    # rounding can repeat a timestep when top - t_m < L: drop repeats, keep the endpoints
    plan = [pts[0]] + [p for prev, p in zip(pts, pts[1:]) if p != prev]
    return plan


def sample_mlcd_timesteps(
    n: int, bounds: list[int], skip: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training timesteps for MLCD: t_hi uniform in (0, T-1], t_lo = max(t_hi - skip, t_step(t_hi)).

    Returns (t_hi, t_lo, t_step) as int64 tensors.
    """
    top = max(bounds)
    t_hi = torch.randint(1, top + 1, (n,), generator=generator)
    t_step = lower_boundary(t_hi, bounds)
    t_lo = torch.maximum(t_hi - skip, t_step)
    return t_hi, t_lo, t_step


# Few-step sampler timesteps of the official TLCM inference (docs/method.md "Sampling") for M = 8.
OFFICIAL_SAMPLER_TIMESTEPS = {
    1: [999],
    2: [999, 499],
    3: [999, 499, 124],
    4: [999, 749, 499, 124],
    5: [999, 749, 499, 249, 124],
    6: [999, 749, 499, 374, 249, 124],
    7: [999, 749, 624, 499, 374, 249, 124],
    8: [999, 874, 749, 624, 499, 374, 249, 124],
}


# How an N-step sampler picks N of the M milestones: "official" is the release's index grid (evenly spaced milestone
# indices; right for the SD/SDXL schedules it was made for); "sigma" takes the milestones whose noise levels are
# nearest to N evenly spaced levels 1, 1 - 1/N, ..., 1/N (docs/flow-matching.md "Which milestones a sampler visits":
# under SD3's shift 3 the index grid's 2-step second milestone sits at sigma 0.75, the level grid's at 0.5)
MILESTONE_GRIDS = ("official", "sigma")


def noise_levels(schedule, timesteps: list[int]) -> list[float]:
    """The flow-time noise level sigma = s_t / (a_t + s_t) of each timestep (float64): a flow teacher's own sigma
    (a_t + s_t = 1), and for a DDPM schedule the sigma of the equivalent flow (x_t / (a_t + s_t) is a flow state)."""
    a, s = schedule.coeffs(torch.tensor(timesteps), torch.zeros(len(timesteps), dtype=torch.float64))
    return (s / (a + s)).tolist()


def level_spaced(upper: list[int], levels: list[float], n_steps: int) -> list[int]:
    """The `n_steps` of the milestones `upper` (descending, noisiest first; `levels` their noise levels) closest in
    total |level - target| to the targets 1, 1 - 1/N, ..., 1/N, the noisiest milestone always first (exact search)."""
    M, targets = len(upper), [1 - k / n_steps for k in range(n_steps)]
    cost = {(0, 0): 0.0}  # (pick k, milestone i) -> least total distance of picks 1..k ending at i
    back: dict[tuple[int, int], int] = {}
    for k in range(1, n_steps):
        for i in range(k, M - (n_steps - 1 - k)):
            j = min((j for j in range(k - 1, i) if (k - 1, j) in cost), key=lambda j: cost[(k - 1, j)])
            cost[(k, i)], back[(k, i)] = cost[(k - 1, j)] + abs(levels[i] - targets[k]), j
    i = min((i for i in range(M) if (n_steps - 1, i) in cost), key=lambda i: cost[(n_steps - 1, i)])
    picks = [i]
    for k in range(n_steps - 1, 0, -1):
        i = back[(k, i)]
        picks.append(i)
    return [upper[i] for i in reversed(picks)]


def sampler_timesteps(n_steps: int, bounds: list[int], grid: str = "official", schedule=None) -> list[int]:
    """The milestone timesteps an N-step TLCM sampler visits (descending, boundary 0 excluded).

    grid "official": for the paper's grid (T=1000, M=8) and N in 1..8 the official release's; otherwise an evenly
    spaced subset of the upper boundaries. grid "sigma": the milestones whose noise levels under `schedule` (a
    NoiseSchedule or FlowSchedule) are nearest to N evenly spaced levels (`level_spaced`). N may not exceed M
    (there are only M milestones to visit).
    """
    upper = sorted(bounds, reverse=True)[:-1]  # M upper boundaries, 999 first
    if not 1 <= n_steps <= len(upper):
        raise ValueError(f"a {n_steps}-step TLCM sampler needs {n_steps} milestones; this schedule has "
                         f"{len(upper)} (schedule.segments); use 1..{len(upper)} steps")
    if grid not in MILESTONE_GRIDS:
        raise ValueError(f"milestone grid {grid!r}; use one of {', '.join(MILESTONE_GRIDS)}")
    if n_steps == len(upper):
        return upper
    if grid == "sigma":
        if schedule is None:
            raise ValueError("the sigma milestone grid needs the teacher's schedule (its noise levels)")
        return level_spaced(upper, noise_levels(schedule, upper), n_steps)
    if upper == OFFICIAL_SAMPLER_TIMESTEPS[8] and n_steps in OFFICIAL_SAMPLER_TIMESTEPS:
        return list(OFFICIAL_SAMPLER_TIMESTEPS[n_steps])
    idx = torch.linspace(0, len(upper), n_steps + 1, dtype=torch.float64)[:-1].floor().long().tolist()
    return [upper[i] for i in idx]


def ddim_timesteps(n_steps: int, T: int = 1000) -> list[int]:
    """Teacher DDIM timesteps with 'trailing' spacing (starts at T-1; best at few steps), descending."""
    if n_steps < 1 or n_steps > T:
        raise ValueError(f"n_steps={n_steps} must be in 1..{T}")
    return [int(round(T - 1 - i * T / n_steps)) for i in range(n_steps)]
