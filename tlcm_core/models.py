"""Loading teachers (a hub id or a local folder, or the toy world's) and one denoiser interface.

Every model the pipeline runs -- teacher, student, target -- is seen through `Denoiser`: the teacher's denoising
network (an SD/SDXL UNet, a FLUX.1 or SD3 transformer) plus its noise schedule, called as
`denoiser(x_t, t, cond) -> (x0, eps)`. What differs between model families (how the network is called, guided and
conditioned, its schedule, its latents) lives in tlcm_core/families/; this module loads teachers and dispatches to
their family. Samplers and solvers take a denoiser and their randomness as arguments (docs/conventions.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .conditioning import Conditioning
from .config import ComputeConfig, TeacherConfig
from .families import FAMILIES, ModelFamily, TeacherError, family_of, resolve_family, supported_pipelines
from .families import vae_scale_factor as _vae_factor
from .families import vae_scale_shift
from .families.unet import is_sdxl, sdxl_time_ids
from .flow_schedule import FlowSchedule, SigmaGrid
from .schedule import NoiseSchedule


# ---------------------------------------------------------------------------------------------------------------------
# Devices and dtypes


def resolve_device(compute: ComputeConfig) -> torch.device:
    if compute.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(compute.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"compute.device={compute.device!r} but no CUDA device is available; use auto or cpu")
    return dev


def resolve_dtype(compute: ComputeConfig, device: torch.device) -> torch.dtype:
    """Weights dtype for frozen inference: compute.dtype on accelerators, compute.cpu_dtype on a CPU (with a warning,
    once per process, where this CPU would emulate bfloat16)."""
    if device.type != "cpu":
        return getattr(torch, compute.dtype)
    if compute.cpu_dtype == "bfloat16" and cpu_has_native_bf16() is False:
        _warn_emulated_bf16()
    return getattr(torch, cpu_dtype_name(compute))


def cpu_dtype_name(compute: ComputeConfig) -> str:
    """compute.cpu_dtype with `auto` resolved: bfloat16 where this CPU computes it natively, else float32 (also where
    /proc/cpuinfo is absent)."""
    if compute.cpu_dtype != "auto":
        return compute.cpu_dtype
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@functools.cache
def _warn_emulated_bf16() -> None:
    logging.getLogger("tlcm").warning(
        "compute.cpu_dtype=bfloat16 on a CPU without AVX512-BF16 or AMX: sampling is emulated and slower than "
        "float32; set compute.cpu_dtype=float32 on this machine")


@functools.cache  # read once per process: every plan's fingerprints and every stage's dtype ask
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX: then bf16 matmuls and convolutions are
    about twice as fast as float32; elsewhere they are emulated and slower). None where /proc/cpuinfo is absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def setup_threads(compute: ComputeConfig) -> None:
    if compute.num_threads:
        torch.set_num_threads(compute.num_threads)


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser


@dataclass
class Denoiser:
    """A teacher network seen through its schedule: `(x_t, t, cond) -> (x0, eps)`, latents (B, C, h, w), integer t.

    `unet` is the network whatever its family (the name predates the families; callers read it). `family` defaults
    to the network's own (by class: FluxTransformer2DModel -> flux, SD3Transformer2DModel -> sd3, else unet).
    """

    unet: torch.nn.Module
    schedule: NoiseSchedule | FlowSchedule
    family: ModelFamily | None = None

    def __post_init__(self):
        if self.family is None:
            self.family = family_of(self.unet)

    @staticmethod
    def _timesteps(x_t: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.ndim == 0 else t

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._timesteps(x_t, t)
        out = self.family.forward(self.unet, x_t, t, cond, self.schedule)
        return self.schedule.to_x0_eps(out.to(x_t.dtype), x_t, t)

    def guided(self, x_t, t, cond: Conditioning, uncond: Conditioning, w: float):
        """Guidance (TLCM eq. 8) as the family applies it (CFG in one batched forward pass, or FLUX.1-dev's guidance
        embedding) on the raw output, converted once by `schedule.to_x0_eps`: no division by a_t, which is 0 at a
        flow schedule's pure noise. Returns (x0, eps) of the guided prediction."""
        t = self._timesteps(x_t, t)
        if w == 1.0:
            return self(x_t, t, cond)
        out = self.family.guided_output(self.unet, x_t, t, cond, uncond, w, self.schedule)
        return self.schedule.to_x0_eps(out, x_t, t)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def resolve_teacher_source(teacher: TeacherConfig) -> str:
    """A local folder (the toy teacher, a path, a downloaded fsspec URL) or a hub id for from_pretrained."""
    world = teacher.toy_world
    if world is not None:
        from .toy import toy_teacher_path

        path = toy_teacher_path(world, teacher.toy_kind)
        if not (Path(path) / "model_index.json").is_file():
            flag = " --flow" if teacher.toy_kind == "flow" else ""
            raise TeacherError(f"the {teacher.toy_kind} toy teacher for world {world!r} is not shipped at {path}; "
                               f"run `tlcm toy-teacher --world {world}{flag}`")
        return str(path)
    if teacher.source.startswith("file://"):
        return teacher.source[len("file://"):]
    if _is_remote(teacher.source):
        import fsspec

        cache = Path(os.environ.get("TLCM_CACHE", Path.home() / ".cache" / "tlcm")) / "teachers"
        key = hashlib.sha256(teacher.source.encode()).hexdigest()[:16]
        dest = cache / key
        if not (dest / "model_index.json").is_file():
            fs, path = fsspec.core.url_to_fs(teacher.source)
            tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        return str(dest)
    return teacher.source


def teacher_identity(teacher: TeacherConfig) -> dict:
    """What identifies the teacher's weights in fingerprints: content hashes where cheap, else id@revision. The T5
    length enters only when set, so fingerprints made before it existed still hold; the family does not (the weights
    determine it: a family that does not fit them is refused)."""
    src = resolve_teacher_source(teacher) if teacher.toy_world else teacher.source
    ident = {"source": teacher.source, "revision": teacher.revision, "variant": teacher.variant,
             "resolution": teacher.resolution}
    if teacher.max_sequence_length is not None:
        ident["max_sequence_length"] = teacher.max_sequence_length
    if teacher.toy_world:
        h = hashlib.sha256()
        for f in sorted(Path(src).rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(src)).encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
        ident["content"] = h.hexdigest()[:16]
    return ident


def _model_index(src: str) -> dict | None:
    p = Path(src) / "model_index.json"
    return json.loads(p.read_text()) if p.is_file() else None


def check_teacher(teacher: TeacherConfig) -> str:
    """Cheap checks before expensive work: the source resolves and names a diffusers pipeline of a supported family
    whose components fit together (read from their config files only)."""
    src = resolve_teacher_source(teacher)
    index = _model_index(src)
    if index is None:
        if Path(src).exists():
            raise TeacherError(f"teacher.source={teacher.source!r}: {src} has no model_index.json (not a diffusers "
                               "pipeline folder)")
        return src  # a hub id: checked when loaded
    where = f"teacher.source={teacher.source!r}"
    family = resolve_family(teacher.family, index.get("_class_name"), where)
    family.check_parts(where, index)

    def config(part: str) -> dict:
        p = Path(src) / part / "config.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise TeacherError(f"{where}: cannot read {p} ({type(e).__name__})") from None

    family.check_shapes(f"{where} ({index.get('_class_name')})", index, config)
    return src


def teacher_family(teacher: TeacherConfig) -> ModelFamily:
    """The teacher's family: `teacher.family`, or (auto) read from its model_index.json (fetched for a hub id)."""
    if teacher.family != "auto":
        return FAMILIES[teacher.family]
    src = resolve_teacher_source(teacher)
    index = _model_index(src)
    if index is None and not Path(src).exists():
        from diffusers import DiffusionPipeline

        index = dict(DiffusionPipeline.load_config(src, revision=teacher.revision))
    return resolve_family("auto", (index or {}).get("_class_name"), f"teacher.source={teacher.source!r}")


def local_family(teacher: TeacherConfig) -> ModelFamily | None:
    """The teacher's family when it is known without fetching anything: `teacher.family` named, a toy teacher, or a
    local folder's model_index.json; None for a hub id or a remote URL (and for a folder that is not a supported
    pipeline: loading it says why)."""
    if teacher.family != "auto":
        return FAMILIES[teacher.family]
    if teacher.toy_world is not None:
        return FAMILIES["sd3" if teacher.toy_kind == "flow" else "unet"]
    if _is_remote(teacher.source):
        return None
    src = teacher.source[len("file://"):] if teacher.source.startswith("file://") else teacher.source
    index = _model_index(src)
    if index is None:
        return None
    try:
        return resolve_family("auto", index.get("_class_name"), f"teacher.source={teacher.source!r}")
    except TeacherError:
        return None


def network_config(teacher: TeacherConfig, family: ModelFamily) -> dict:
    """The config of the teacher's denoising network (its config.json only; no weights)."""
    src = resolve_teacher_source(teacher)
    return dict(family.network_loader().load_config(src, subfolder=family.network_part, revision=teacher.revision))


def load_schedule(teacher: TeacherConfig) -> NoiseSchedule | FlowSchedule:
    """The teacher's schedule from its scheduler config (a flow teacher's shift at teacher.resolution)."""
    from diffusers import DDIMScheduler

    family = teacher_family(teacher)
    src = resolve_teacher_source(teacher)
    config = DDIMScheduler.load_config(src, subfolder="scheduler", revision=teacher.revision)  # only reads the JSON
    seq = None if family.name == "unet" else family.image_seq_len(
        teacher.resolution, vae_scale_factor_of(teacher), network_config(teacher, family))
    return family.schedule(config, seq)


def load_unet(teacher: TeacherConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """The teacher's denoising network alone, frozen: its UNet, or its transformer for a flow family (the student
    starts from it; MLCD loads nothing else)."""
    family = teacher_family(teacher)
    quiet_hub_logging()
    src = resolve_teacher_source(teacher)
    net = family.network_loader().from_pretrained(src, subfolder=family.network_part, revision=teacher.revision,
                                                  variant=teacher.variant, dtype=dtype)
    return net.to(device).eval().requires_grad_(False)


def quiet_hub_logging() -> None:
    """Loading bars of diffusers/transformers say nothing useful in a pipeline log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(teacher: TeacherConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """The whole diffusers pipeline (text encoders, VAE, the denoising network) of a supported family, frozen."""
    from diffusers import DiffusionPipeline

    quiet_hub_logging()
    src = check_teacher(teacher)
    pipe = DiffusionPipeline.from_pretrained(src, revision=teacher.revision, variant=teacher.variant,
                                             dtype=dtype)
    family = resolve_family(teacher.family, type(pipe).__name__, f"teacher.source={teacher.source!r} (loaded)")
    pipe.set_progress_bar_config(disable=True)
    for name in (family.network_part, "vae", *family.text_encoder_parts):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False).eval()
    return pipe.to(device)


def network_of(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: its UNet or its transformer."""
    return family_of(pipe).network(pipe)


def teacher_denoiser(pipe, resolution: int) -> Denoiser:
    """The loaded pipeline's network through its schedule (a flow schedule shifted for `resolution`)."""
    family = family_of(pipe)
    return Denoiser(family.network(pipe), schedule_of(pipe, resolution), family)


def check_prompts(pipe, prompts: list[str], source: str = "prompts") -> None:
    """Every prompt fits the tokenizer (no silent truncation); raise naming the offending lines."""
    limit = pipe.tokenizer.model_max_length
    too_long = []
    for i, p in enumerate(prompts):
        n = len(pipe.tokenizer(p, truncation=False).input_ids)
        if n > limit:
            too_long.append(f"line {i + 1} ({n} tokens > {limit}): {p[:60]!r}")
    if too_long:
        raise ValueError(f"{source}: {len(too_long)} prompt(s) longer than the tokenizer allows; shorten them:\n  "
                         + "\n  ".join(too_long[:10]))


def encode_prompts(pipe, prompts: list[str], resolution: int, batch_size: int = 64,
                   max_sequence_length: int | None = None) -> tuple[Conditioning, Conditioning]:
    """Text conditioning for each prompt and the unconditional (batch of one), as the pipeline itself encodes them
    (its family's encode_prompts; `max_sequence_length`: T5 tokens of a FLUX.1 / SD3 teacher)."""
    return family_of(pipe).encode_prompts(pipe, prompts, resolution, batch_size, max_sequence_length)


def latent_shape(pipe_or_unet, resolution: int, vae_scale_factor: int | None = None) -> tuple[int, int, int]:
    """(C, h, w) of the latents the stages see at `resolution`, from a pipeline or its bare network."""
    family = family_of(pipe_or_unet)
    net = getattr(pipe_or_unet, family.network_part, pipe_or_unet)
    f = vae_scale_factor or getattr(pipe_or_unet, "vae_scale_factor", None)
    if f is None:
        raise ValueError("vae_scale_factor unknown")
    if resolution % f:
        raise ValueError(f"teacher.resolution={resolution} is not divisible by the VAE factor {f}")
    side, multiple = resolution // f, family.latent_side_multiple(net.config)
    if side % multiple:
        raise ValueError(f"teacher.resolution={resolution}: its {side}-latent side is not a multiple of {multiple} "
                         f"({family.name} packs or patches latents {multiple}x{multiple}); use a multiple of "
                         f"{f * multiple}")
    return (family.latent_channels(net.config), side, side)


def vae_scale_factor_of(teacher: TeacherConfig) -> int:
    from diffusers import AutoencoderKL

    src = resolve_teacher_source(teacher)
    return _vae_factor(AutoencoderKL.load_config(src, subfolder="vae", revision=teacher.revision))


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W) float32."""
    return decode_latents_grad(pipe, latents)


def images_uint8(images: torch.Tensor):
    """Images in [0, 1], (B, 3, H, W) -> uint8 pixels (B, H, W, 3) as a numpy array: what every PNG, grid and image
    metric here sees."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")


def decode_latents_grad(pipe, latents: torch.Tensor) -> torch.Tensor:
    """As decode_latents, differentiable w.r.t. the latents (the VAE itself stays frozen). The latents are the
    network's, `(z - shift) * scale` of the VAE's z (vae_scale_shift)."""
    vae = pipe.vae
    scale, shift = vae_scale_shift(vae.config)
    z = latents.to(vae.dtype) / scale
    if shift:
        z = z + shift
    img = vae.decode(z, return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


__all__ = [
    "Conditioning", "Denoiser", "TeacherError", "check_prompts", "check_teacher", "decode_latents",
    "encode_prompts", "is_sdxl", "latent_shape", "load_pipeline", "load_schedule", "load_unet", "network_of",
    "cpu_has_native_bf16", "resolve_device", "resolve_dtype", "resolve_teacher_source", "sdxl_time_ids",
    "setup_threads",
    "supported_pipelines", "teacher_denoiser", "teacher_family", "teacher_identity", "vae_scale_factor_of",
]


def schedule_of(pipe, resolution: int | None = None):
    """The loaded pipeline's schedule. A flow teacher's shift may depend on the resolution (FLUX): pass it."""
    family = family_of(pipe)
    seq = None
    if resolution is not None and family.name != "unet":
        seq = family.image_seq_len(resolution, pipe.vae_scale_factor, family.network(pipe).config)
    return family.schedule(dict(pipe.scheduler.config), seq)


def teacher_grid(pipe, resolution: int, steps: int) -> SigmaGrid | None:
    """A flow teacher's own Euler grid at `steps` steps for `resolution` (what its stock pipeline's scheduler
    visits, shifted for that image size); None for a DDPM-time teacher (DDIM on trailing integer timesteps)."""
    family = family_of(pipe)
    seq = None
    if family.name != "unet":
        seq = family.image_seq_len(resolution, pipe.vae_scale_factor, family.network(pipe).config)
    grid = family.euler_grid(dict(pipe.scheduler.config), steps, seq)
    return None if grid is None else SigmaGrid(*grid)


def load_vae(teacher, device: torch.device):
    """The teacher's AutoencoderKL alone, float32 (SDXL's VAE overflows in fp16), frozen."""
    from diffusers import AutoencoderKL

    quiet_hub_logging()
    src = resolve_teacher_source(teacher)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", revision=teacher.revision, dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False)


def vae_decoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents (the network's scale) -> images in [0, 1], as models.decode_latents (which only needs `.vae`)."""
    from types import SimpleNamespace

    holder = SimpleNamespace(vae=vae)
    return lambda z: decode_latents(holder, z.to(vae.device))


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """images in [0, 1] (N, 3, H, W) -> latents at the network's scale (the mean of the VAE posterior)."""
    p = next(vae.parameters())
    sf, shift = vae_scale_shift(vae.config)
    shift = shift or 0.0
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(p.device, p.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        out.append(((z - shift) * sf).float().cpu())
    return torch.cat(out)
