"""`FlowMatchTLCMScheduler`: the TLCM few-step sampler for flow-matching pipelines (docs/flow-matching.md).

Drop-in for diffusers' `FluxPipeline` and `StableDiffusion3Pipeline` (their img2img variants use `scale_noise`),
run without CFG (guidance is distilled into the LoRA; SD3: `guidance_scale` <= 1, FLUX.1-dev's embedded guidance
value is whatever the LoRA was distilled with):

    pipe.scheduler = FlowMatchTLCMScheduler.from_base(pipe.scheduler.config)  # keeps the base model's shift
    g = torch.Generator().manual_seed(0)
    pipe.scheduler.set_noise_generator(g)  # these pipelines never pass their generator to step()
    image = pipe(prompt, num_inference_steps=4, generator=g).images[0]

`set_timesteps(N)` visits the TLCM milestones (indices 999, 499 for N = 2; 999, 749, 499, 124 for N = 4, ...) at the
base model's training sigmas: index t has the unshifted level (t+1)/T, shifted by the fixed `shift` (SD3) or by the
resolution-dependent `mu` the pipeline passes (FLUX, `use_dynamic_shifting`); with `milestone_grid="sigma"` it visits
the milestones whose sigmas are nearest to evenly spaced ones instead (999, 249 for N = 2 under shift 3). `timesteps`
holds sigma * T, as diffusers' flow schedulers do. Each `step` turns the velocity into x0 = x - sigma v, then re-noises
x0 to the next milestone's sigma with fresh noise (`sampler="renoise"`, the official release's flow scheduler) or takes
the deterministic DDIM jump there (`sampler="multistep"`, x + (sigma_next - sigma) v); the last step returns x0 as
`prev_sample`. Per step this is exactly `tlcm_core.samplers.tlcm_sample` on `tlcm_core.flow_schedule.FlowSchedule`: the
same float64 sigmas, the same operations in the same order, the same noise draws (tests/test_flow_scheduler.py).

Fresh noise comes from the `generator` passed to `step`, else from the one given to `set_noise_generator` (pass the
pipeline's own generator object: the images are then those of tlcm_sample with that generator), else from torch's
global RNG, as diffusers' stochastic flow sampling does.

This file imports only torch, numpy and diffusers, so it can ship as a copy beside an exported LoRA, like
tlcm_core/scheduler.py. Keep it self-contained.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("renoise", "multistep")
MILESTONE_GRIDS = ("official", "sigma")  # see set_timesteps
TIME_SHIFT_TYPES = ("exponential", "linear")
# FlowMatchEulerDiscreteScheduler options that change the sigma <-> time relation or only shape its own Euler grid
UNSUPPORTED_OPTIONS = ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                       "use_beta_sigmas")

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


def shifted_sigmas(indices: torch.Tensor, T: int, shift: float, mu: float | None, time_shift_type: str) -> torch.Tensor:
    """Training sigmas (float64) of integer indices: level (t+1)/T, then the fixed shift (mu None) or the dynamic one.
    Same float operations as tlcm_core.flow_schedule.flow_sigmas, so the same bits."""
    u = (indices.to(torch.float64) + 1) / T
    if mu is None:
        return shift * u / (1 + (shift - 1) * u)
    if time_shift_type == "exponential":
        e = math.exp(mu)
        return e / (e + (1 / u - 1))
    return mu / (mu + (1 / u - 1))


@dataclass
class FlowMatchTLCMSchedulerOutput(BaseOutput):
    """prev_sample: the latents for the next step (x0 after the last step); denoised: this step's x0 estimate."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class FlowMatchTLCMScheduler(SchedulerMixin, ConfigMixin):
    """TLCM multistep-consistency sampling on milestone sigmas of a flow-matching model (arXiv 2406.05768)."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int | None = 256,
        max_image_seq_len: int | None = 4096,
        time_shift_type: str = "exponential",
        segments: int = 8,
        sampler: str = "renoise",
        milestone_grid: str = "official",
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}; use one of {', '.join(SAMPLERS)}")
        if milestone_grid not in MILESTONE_GRIDS:
            raise ValueError(f"milestone_grid={milestone_grid!r}; use one of {', '.join(MILESTONE_GRIDS)}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type={time_shift_type!r}; supported: {', '.join(TIME_SHIFT_TYPES)}")
        if not 1 <= segments < num_train_timesteps:
            raise ValueError(f"segments={segments} must be in 1..{num_train_timesteps - 1}")
        if shift <= 0:
            raise ValueError(f"shift={shift} must be > 0")
        self.init_noise_sigma = 1.0
        self.milestones = tlcm_milestones(num_train_timesteps, segments)
        self.noise_generator: torch.Generator | list[torch.Generator] | None = None
        self.num_inference_steps: int | None = None
        # until set_timesteps: all M milestones; unshifted under dynamic shifting (mu comes with set_timesteps), like
        # FlowMatchEulerDiscreteScheduler's own initial sigmas
        self._set_indices(self.milestones[:-1], None)

    # -- timesteps ---------------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None):
        """N steps on the milestones (1 <= N <= segments).

        FluxPipeline calls `set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)` (its default Euler grid, which only
        carries N here); other sigmas are refused, since a TLCM LoRA samples only at its milestones. `mu` sets the
        dynamic shift (required with `use_dynamic_shifting`, ignored otherwise, as in FlowMatchEulerDiscreteScheduler).
        Which N milestones: `milestone_grid="official"` the release's indices (999, 499 for N = 2); `"sigma"` those
        whose shifted sigmas are nearest to 1, 1 - 1/N, ..., 1/N (999, 249 for N = 2 under SD3's shift 3), chosen at
        this call's shift, so under FLUX's dynamic shift they may change with the image size.
        """
        M = self.config.segments
        if sigmas is not None:
            n = len(sigmas)
            if num_inference_steps is not None and num_inference_steps != n:
                raise ValueError(f"num_inference_steps={num_inference_steps} but {n} sigmas were passed")
            if not np.allclose(np.asarray(sigmas, dtype=np.float64), np.linspace(1.0, 1 / n, n), rtol=0, atol=1e-6):
                raise ValueError("FlowMatchTLCMScheduler samples at the TLCM milestones' sigmas; custom sigmas are "
                                 "not supported: pass num_inference_steps only")
            num_inference_steps = n
        if num_inference_steps is None or not 1 <= num_inference_steps <= M:
            raise ValueError(f"num_inference_steps={num_inference_steps}: TLCM samples on the {M} milestone "
                             f"timesteps, so use 1..{M} steps (2-8 for the paper's LoRAs)")
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting=True: pass mu (the pipelines compute it from the image size)")
        grid = self.config.milestone_grid  # "sigma": chosen by the upper milestones' sigmas at this sampling's shift
        levels = self._shifted(torch.tensor(self.milestones[:-1]), mu).tolist() if grid == "sigma" else None
        self._set_indices(tlcm_sampler_timesteps(num_inference_steps, self.milestones, grid, levels), mu, device)
        self.num_inference_steps = num_inference_steps

    def _set_indices(self, indices: list[int], mu: float | None, device=None) -> None:
        c = self.config
        self.step_indices = torch.tensor(indices, dtype=torch.long)  # the integer milestones visited
        self.mu = mu if c.use_dynamic_shifting else None
        sig = self._shifted(self.step_indices, self.mu)
        self._sigmas64 = sig  # float64, the coefficients of the math (cast to the sample dtype at use)
        # what the pipelines read: float32 sigma * T, and the sigmas with diffusers' terminal 0 appended
        self.timesteps = (sig * c.num_train_timesteps).to(device=device, dtype=torch.float32)
        self.sigmas = torch.cat([sig, sig.new_zeros(1)]).to(device=device, dtype=torch.float32)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _shifted(self, indices: torch.Tensor, mu: float | None) -> torch.Tensor:
        """Training sigmas (float64) of integer `indices`: the fixed shift, or under dynamic shifting `mu`'s (without
        mu, only before set_timesteps, the levels stay unshifted: shift 1 is the identity)."""
        c = self.config
        dynamic = c.use_dynamic_shifting
        return shifted_sigmas(indices, c.num_train_timesteps, 1.0 if dynamic else c.shift, mu if dynamic else None,
                              c.time_shift_type)

    def set_noise_generator(self, generator: torch.Generator | list[torch.Generator] | None) -> None:
        """The generator re-noising draws from when `step` gets none (FluxPipeline and StableDiffusion3Pipeline never
        pass one). Pass the pipeline's own generator to sample what tlcm_sample samples with it."""
        self.noise_generator = generator

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _index_of(self, timestep) -> int:
        t = torch.as_tensor(timestep).reshape(-1)[0].to("cpu", torch.float32)
        where = (self.timesteps.cpu() == t).nonzero()
        if len(where) == 0:
            raise ValueError(f"timestep {float(t)} is not one of this scheduler's timesteps "
                             f"{self.timesteps.tolist()} (sigma * {self.config.num_train_timesteps})")
        return int(where[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self._index_of(timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # -- the math (as tlcm_core.flow_schedule.FlowSchedule, operation for operation) ---------------------------------

    def _coeffs(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) = (1 - sigma, sigma) of the i-th visited step, as 0-dim tensors in like's dtype and device."""
        sigma = self._sigmas64[i]  # float64 math on the CPU (exact either way; MPS has no float64), then cast
        return (1 - sigma).to(like.dtype).to(like.device), sigma.to(like.dtype).to(like.device)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process at a visited timestep, (1 - sigma) sample + sigma noise (img2img / inpainting pipelines)."""
        if self._begin_index is None:
            i = self._index_of(timestep)
        else:
            i = self._step_index if self._step_index is not None else self._begin_index
        a, s = self._coeffs(i, sample)
        return a * sample + s * noise

    def _noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        # float32 noise drawn where the generator lives (the CPU one by default, as tlcm_sample draws it), then moved:
        # a CPU generator gives the same images on any device
        gen = generator if generator is not None else self.noise_generator
        first = gen[0] if isinstance(gen, list) else gen
        device = first.device if first is not None else torch.device("cpu")
        return randn_tensor(like.shape, generator=gen, device=device, dtype=torch.float32).to(like)

    # -- one sampler step --------------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True):
        """x0 from the velocity; then re-noise (fresh noise) or DDIM-jump to the next milestone; x0 at the end.

        Computed in float32 at least (a bfloat16 pipeline's latents are upcast for the step, as diffusers' flow
        schedulers do) and returned in the sample's dtype.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self.step_indices):
            raise ValueError(f"all {len(self.step_indices)} steps are done; call set_timesteps() to sample again")
        dtype = sample.dtype
        x = sample.to(torch.promote_types(dtype, torch.float32))
        a, s = self._coeffs(i, x)
        x0 = x - s * model_output.to(x.dtype)  # TLCM's x0 from a velocity v = eps - x0
        if i + 1 >= len(self.step_indices):
            prev = x0
        else:
            a_n, s_n = self._coeffs(i + 1, x)
            if self.config.sampler == "renoise":
                prev = a_n * x0 + s_n * self._noise(x, generator)
            else:  # the DDIM jump, as tlcm_core.schedule.ddim: eps recovered from (x, x0), then re-combined
                eps = (x - a * x0) / s
                prev = a_n * x0 + s_n * eps
        self._step_index = i + 1
        prev, x0 = prev.to(dtype), x0.to(dtype)
        if not return_dict:
            return (prev, x0)
        return FlowMatchTLCMSchedulerOutput(prev_sample=prev, denoised=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def from_base(cls, base_config, **overrides) -> FlowMatchTLCMScheduler:
        """From a base model's FlowMatchEulerDiscreteScheduler config: keeps its shift settings (fixed `shift`, or
        `use_dynamic_shifting` with base/max shift and sequence lengths), refuses options it cannot honour."""
        config = dict(base_config)
        for key in UNSUPPORTED_OPTIONS:
            if config.get(key):
                raise ValueError(f"base scheduler option {key}={config[key]!r} is not supported by "
                                 f"FlowMatchTLCMScheduler (it samples at the training sigmas of the TLCM milestones)")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls.from_config({k: v for k, v in config.items() if k in known}, **overrides)
