"""The math of TLCM in flow-matching time (docs/flow-matching.md): rectified-flow teachers such as FLUX.1 and SD3.x.

A flow teacher is trained on `x_sigma = (1 - sigma) x0 + sigma eps` and predicts the velocity `v = eps - x0`. That is
the `x_t = a_t x0 + s_t eps` of tlcm_core.schedule with `a_t = 1 - sigma_t`, `s_t = sigma_t`, so `FlowSchedule` offers
NoiseSchedule's interface (`T`, `coeffs`, `to_x0_eps`, `add_noise`, `prediction_type`) and `ddim`, `milestones`,
`sampler_timesteps` and the samplers of tlcm_core.samplers run on it unchanged. Integer timesteps `t` in [0, T) index
diffusers' training sigmas: `t = T-1` is pure noise (sigma = 1, so a_t = 0), `t = 0` the least noisy level.
Plain tensor math, like schedule.py: no models, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Options of diffusers' FlowMatchEulerDiscreteScheduler that change the sigma <-> time relation (or only make sense for
# its own Euler grid). None of the supported teachers sets them; refuse them rather than ignore them.
UNSUPPORTED_OPTIONS = ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                       "use_beta_sigmas")
TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift of FLUX: mu linear in the image token count, base_shift at base_image_seq_len
    and max_shift at max_image_seq_len (the pipelines' `calculate_shift`, same float operations, so the same mu)."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    intercept = base_shift - slope * base_image_seq_len
    return image_seq_len * slope + intercept


def flow_sigmas(T: int = 1000, shift: float = 1.0, mu: float | None = None,
                time_shift_type: str = "exponential") -> torch.Tensor:
    """sigma_t for t = 0..T-1 (float64, increasing in t): the unshifted level (t+1)/T, then shifted.

    mu None: the fixed shift of SD3, `shift * u / (1 + (shift - 1) u)`; mu given: the dynamic shift of FLUX,
    `e^mu / (e^mu + 1/u - 1)` (exponential) or `mu / (mu + 1/u - 1)` (linear). Both map u = 1 to exactly 1.
    """
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    if mu is None:
        return shift * u / (1 + (shift - 1) * u)
    if time_shift_type == "exponential":
        e = math.exp(mu)
        return e / (e + (1 / u - 1))
    if time_shift_type == "linear":
        return mu / (mu + (1 / u - 1))
    raise ValueError(f"time_shift_type={time_shift_type!r}; supported: {', '.join(TIME_SHIFT_TYPES)}")


def check_flow_config(config: dict) -> None:
    """Refuse diffusers flow-scheduler options this schedule does not reproduce, naming the option."""
    for key in UNSUPPORTED_OPTIONS:
        if config.get(key):
            raise ValueError(f"flow scheduler option {key}={config[key]!r} is not supported (TLCM samples on the "
                             f"training sigmas of its milestones); remove it from the scheduler config")
    kind = config.get("time_shift_type", "exponential")
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type={kind!r}; supported: {', '.join(TIME_SHIFT_TYPES)}")


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching teacher's noise levels: `sigmas[t]` for t = 0..T-1 (float64, increasing), velocity output.

    `sigmas[t]` is diffusers' training sigma `FlowMatchEulerDiscreteScheduler.sigmas[T-1-t]` with the model's shift
    applied (diffusers lists them from the noisiest down and computes them in float32).
    """

    sigmas: torch.Tensor  # (T,) float64
    prediction_type: str = "flow"

    def __post_init__(self):
        if self.prediction_type != "flow":
            raise ValueError(f"FlowSchedule predicts velocity (prediction_type='flow'), not {self.prediction_type!r}")

    @classmethod
    def from_config(cls, scheduler_config: dict, image_seq_len: int | None = None) -> FlowSchedule:
        """From a diffusers FlowMatchEulerDiscreteScheduler config (num_train_timesteps, shift, use_dynamic_shifting,
        base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type).

        `image_seq_len` (the number of image tokens the transformer sees: for FLUX the packed latent length,
        (H/16) (W/16) at the VAE's 8x; for SD3 (h/patch) (w/patch) of the latents) sets the dynamic shift and is
        required when `use_dynamic_shifting` is on; with a fixed shift it does not matter.
        """
        config = dict(scheduler_config)
        check_flow_config(config)
        T = int(config.get("num_train_timesteps", 1000))
        if not config.get("use_dynamic_shifting", False):
            return cls(flow_sigmas(T, shift=float(config.get("shift", 1.0))))
        if image_seq_len is None:
            raise ValueError("this flow scheduler shifts its sigmas by resolution (use_dynamic_shifting=True): pass "
                             "image_seq_len, the number of image tokens at the sampling resolution")
        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        missing = [k for k in keys if config.get(k) is None]
        if missing:
            raise ValueError(f"use_dynamic_shifting=True needs {', '.join(missing)} in the scheduler config")
        mu = calculate_mu(image_seq_len, *(config[k] for k in keys))
        return cls(flow_sigmas(T, mu=mu, time_shift_type=config.get("time_shift_type", "exponential")))

    @property
    def T(self) -> int:
        return self.sigmas.shape[0]

    def coeffs(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) = (1 - sigma_t, sigma_t) shaped to broadcast against `like`, in like's dtype/device."""
        t = torch.as_tensor(t).long().cpu()
        sigma = self.sigmas[t].to(device=like.device, dtype=torch.float64)
        shape = (-1,) + (1,) * (like.ndim - 1) if sigma.ndim else ()
        a, s = (1 - sigma).reshape(shape), sigma.reshape(shape)
        return a.to(like.dtype), s.to(like.dtype)

    def to_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity v = eps - x0 to (x0, eps): x0 = x_t - sigma v, eps = x_t + (1 - sigma) v (no division: finite at
        sigma = 1, where a_t = 0)."""
        a, s = self.coeffs(t, x_t)
        return x_t - s * model_output, x_t + a * model_output

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """The forward process x_t = (1 - sigma_t) x0 + sigma_t eps (TLCM eq. 9 in flow time)."""
        a, s = self.coeffs(t, x0)
        return a * x0 + s * eps

    def model_timestep(self, t: torch.Tensor | int) -> torch.Tensor:
        """The timestep value the pipelines hold for index t: sigma_t * T (float64; the pipelines keep it float32).

        FluxPipeline passes `timestep / 1000` (sigma itself) to FluxTransformer2DModel, which multiplies by 1000
        inside; StableDiffusion3Pipeline passes `timestep` (sigma * 1000) to SD3Transformer2DModel as it is. Both
        take `timestep` from `scheduler.timesteps` (float32) and cast it to the latents' dtype.
        """
        return self.sigmas[torch.as_tensor(t).long().cpu()] * self.T


@dataclass(frozen=True)
class SigmaGrid:
    """A stock sampler's own grid seen through the one method a family's network call reads of a schedule:
    `model_timestep(i)` is the grid's i-th timestep (sigma * T, float32, noisiest first), so `family.forward` and
    `family.guided_output` call the network at noise levels between the integer indices of a FlowSchedule.

    `timesteps` and `sigmas` are a FlowMatchEulerDiscreteScheduler's after its `set_timesteps` (`sigmas` one longer,
    ending with the terminal 0): what `ModelFamily.euler_grid` returns and `samplers.euler_sample` steps through.
    """

    timesteps: torch.Tensor  # (N,) float32
    sigmas: torch.Tensor  # (N + 1,) float32

    def model_timestep(self, i: torch.Tensor | int) -> torch.Tensor:
        return self.timesteps[torch.as_tensor(i).long().cpu()]
