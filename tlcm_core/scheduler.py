"""`TLCMScheduler`: the TLCM few-step sampler as a diffusers scheduler (docs/method.md "Sampling").

Drop-in for any diffusers SD/SDXL pipeline run without guidance (`guidance_scale=0` or `1`; guidance is distilled
into the LoRA):

    pipe.scheduler = TLCMScheduler.from_base(pipe.scheduler.config)   # keeps the base model's betas
    image = pipe(prompt, num_inference_steps=4, guidance_scale=0, generator=torch.Generator().manual_seed(0)).images[0]

`set_timesteps(N)` visits the milestone timesteps of the official TLCM inference (999, 499 for N = 2; 999, 749, 499,
124 for N = 4, ...), or with `milestone_grid="sigma"` those at evenly spaced noise levels. Each `step` turns the model
output into x0 and then either re-noises x0 to the next timestep with fresh noise from `generator`
(`sampler="renoise"`, the official LCM-style inference) or takes the deterministic DDIM jump there
(`sampler="multistep"`); the last step returns x0 itself as `prev_sample`. Per step this is exactly
`tlcm_core.samplers.tlcm_sample`: the same float64 schedule coefficients, the same operations in the same order and the
same noise draws (tests/test_generate.py checks equality).

This file imports only torch and diffusers, so the `export` stage ships a copy of it as `scheduling_tlcm.py` next to
the scheduler config: users of an exported LoRA need no part of this project. Keep it self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("renoise", "multistep")
MILESTONE_GRIDS = ("official", "sigma")  # see set_timesteps
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# The official TLCM inference's step subsets of the M = 8 milestones (docs/method.md "Sampling").
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


def tlcm_milestones(num_train_timesteps: int, segments: int) -> list[int]:
    """Segment boundaries, descending: floor(linspace(T-1, 0, M+1)) (999, 874, ..., 124, 0 for T=1000, M=8)."""
    pts = torch.linspace(num_train_timesteps - 1, 0, segments + 1, dtype=torch.float64).floor()
    return [int(v) for v in pts.tolist()]


def tlcm_sampler_timesteps(n_steps: int, bounds: list[int], grid: str = "official",
                           levels: list[float] | None = None) -> list[int]:
    """The milestone indices an N-step TLCM sampler visits (same rule as tlcm_core.schedule.sampler_timesteps):
    grid "sigma" takes `levels`, the noise levels of the upper milestones (descending bounds minus the last)."""
    upper = sorted(bounds, reverse=True)[:-1]
    if n_steps >= len(upper):
        return upper
    if grid == "sigma":
        return level_spaced(upper, levels, n_steps)
    if upper == OFFICIAL_SAMPLER_TIMESTEPS[8] and n_steps in OFFICIAL_SAMPLER_TIMESTEPS:
        return list(OFFICIAL_SAMPLER_TIMESTEPS[n_steps])
    idx = torch.linspace(0, len(upper), n_steps + 1, dtype=torch.float64)[:-1].floor().long().tolist()
    return [upper[i] for i in idx]


def level_spaced(upper: list[int], levels: list[float], n_steps: int) -> list[int]:
    """The `n_steps` of the milestones `upper` (descending; `levels` their noise levels) closest in total
    |level - target| to 1, 1 - 1/N, ..., 1/N, the noisiest first (same rule as tlcm_core.schedule.level_spaced)."""
    M, targets = len(upper), [1 - k / n_steps for k in range(n_steps)]
    cost = {(0, 0): 0.0}
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


@dataclass
class TLCMSchedulerOutput(BaseOutput):
    """prev_sample: the latents for the next step (x0 after the last step); denoised: this step's x0 estimate."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TLCMScheduler(SchedulerMixin, ConfigMixin):
    """TLCM multistep-consistency sampling on milestone timesteps (Xie et al. 2024, arXiv 2406.05768)."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        segments: int = 8,
        sampler: str = "renoise",
        rescale_betas_zero_snr: bool = False,
        milestone_grid: str = "official",
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}; use one of {', '.join(SAMPLERS)}")
        if milestone_grid not in MILESTONE_GRIDS:
            raise ValueError(f"milestone_grid={milestone_grid!r}; use one of {', '.join(MILESTONE_GRIDS)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
        if rescale_betas_zero_snr:
            raise ValueError("zero-terminal-SNR schedules are not supported (rescale_betas_zero_snr=True)")
        if not 1 <= segments < num_train_timesteps:
            raise ValueError(f"segments={segments} must be in 1..{num_train_timesteps - 1}")
        T = num_train_timesteps
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule={beta_schedule!r}; supported: scaled_linear, linear, trained_betas")
        # float64, like tlcm_core.schedule.NoiseSchedule: coefficients are cast to the sample dtype at use
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.init_noise_sigma = 1.0
        self.milestones = tlcm_milestones(T, segments)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor(self.milestones[:-1], dtype=torch.long)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # -- timesteps ---------------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None):
        """N steps on the milestones (1 <= N <= segments), or explicit descending `timesteps` in [0, T).

        Which N: `milestone_grid="official"` the release's (999, 499 for N = 2), `"sigma"` those whose noise levels
        s_t / (a_t + s_t) are nearest to 1, 1 - 1/N, ..., 1/N (the choice `evaluate.milestone_grid` makes)."""
        T, M = self.config.num_train_timesteps, self.config.segments
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps={ts} must be strictly descending and in [0, {T})")
        else:
            if num_inference_steps is None or not 1 <= num_inference_steps <= M:
                raise ValueError(f"num_inference_steps={num_inference_steps}: TLCM samples on the {M} milestone "
                                 f"timesteps, so use 1..{M} steps (2-8 for the paper's LoRAs)")
            grid, levels = self.config.milestone_grid, None
            if grid == "sigma":  # the upper milestones' noise levels: the equivalent flow's sigma, s / (a + s)
                ab = self.alphas_cumprod[torch.tensor(self.milestones[:-1])]
                a, s = ab.sqrt(), (1 - ab).sqrt()
                levels = (s / (a + s)).tolist()
            ts = tlcm_sampler_timesteps(num_inference_steps, self.milestones, grid, levels)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = int(timestep)
        where = (self.timesteps.cpu() == t).nonzero()
        if len(where) == 0:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps {self.timesteps.tolist()}")
        self._step_index = int(where[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # -- the math (as tlcm_core.schedule.NoiseSchedule, operation for operation) -------------------------------------

    def _coeffs(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) in like's dtype, broadcastable against it."""
        t = torch.as_tensor(t).long().cpu()
        ab = self.alphas_cumprod[t].to(device=like.device, dtype=torch.float64)
        shape = (-1,) + (1,) * (like.ndim - 1) if ab.ndim else ()
        a, s = ab.sqrt().reshape(shape), (1 - ab).sqrt().reshape(shape)
        return a.to(like.dtype), s.to(like.dtype)

    def _x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self._coeffs(t, x_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (x_t - s * eps) / a
        elif kind == "v_prediction":
            x0 = a * x_t - s * model_output
            eps = s * x_t + a * model_output
        else:
            x0 = model_output
            eps = (x_t - a * x0) / s
        return x0, eps

    def _ddim(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, s: int) -> torch.Tensor:
        if t == s:
            return x_t
        a_t, s_t = self._coeffs(t, x_t)
        a_s, s_s = self._coeffs(s, x_t)
        eps = (x_t - a_t * x0) / s_t
        return a_s * x0 + s_s * eps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x0) (TLCM eq. 9); used by img2img-style pipelines."""
        a, s = self._coeffs(timesteps, original_samples)
        return a * original_samples + s * noise

    # -- one sampler step --------------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True):
        """x0 from the model output; then re-noise (fresh noise) or DDIM-jump to the next timestep; x0 at the end."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        t = int(self.timesteps[i])
        x0, _ = self._x0_eps(model_output.to(sample.dtype), sample, t)
        if i + 1 >= len(self.timesteps):
            prev = x0
        else:
            s = int(self.timesteps[i + 1])
            if self.config.sampler == "renoise":
                # float32 noise drawn where the generator lives (the CPU one by default, as tlcm_sample draws it),
                # then moved: a CPU generator gives the same images on any device
                gen = generator[0] if isinstance(generator, list) else generator
                noise = randn_tensor(sample.shape, generator=generator,
                                     device=gen.device if gen is not None else torch.device("cpu"),
                                     dtype=torch.float32).to(sample)
                a, s_ = self._coeffs(s, x0)
                prev = a * x0 + s_ * noise
            else:
                prev = self._ddim(sample, x0, t, s)
        self._step_index = i + 1
        if not return_dict:
            return (prev, x0)
        return TLCMSchedulerOutput(prev_sample=prev, denoised=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def from_base(cls, base_config, **overrides) -> TLCMScheduler:
        """From a base model's scheduler config (Euler, DDIM, ...): keeps its noise schedule, drops the rest."""
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls.from_config({k: v for k, v in dict(base_config).items() if k in known}, **overrides)
