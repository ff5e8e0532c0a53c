"""Loading teachers (SDXL from a hub id or a local folder, or the toy world's) and one denoiser interface.

Every model the pipeline runs -- teacher, student, target -- is seen through `Denoiser`: a UNet plus the
teacher's noise schedule, called as `denoiser(x_t, t, cond) -> (x0, eps)`. Samplers and solvers take a
denoiser and their randomness as arguments (docs/conventions.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from .config import ComputeConfig, TeacherConfig
from .errors import UserError
from .schedule import NoiseSchedule, cfg

SUPPORTED_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")


class TeacherError(UserError, ValueError):
    """The teacher cannot be used (not found, wrong kind, missing parts)."""


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
    """Weights dtype for frozen inference; half precision only on accelerators (CPU stays float32)."""
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, compute.dtype)


def setup_threads(compute: ComputeConfig) -> None:
    if compute.num_threads:
        torch.set_num_threads(compute.num_threads)


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Conditioning:
    """What the UNet needs besides (x_t, t). SDXL adds the pooled text embedding and the 6 size/crop ids."""

    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, Dp)  SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6)  SDXL only

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                               for f in fields(self)})

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def __getitem__(self, idx) -> Conditioning:
        return self._map(lambda v: v[idx])

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def expand(self, n: int) -> Conditioning:
        """Repeat a batch-of-one conditioning n times (e.g. the unconditional)."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        def _cat(name):
            vals = [getattr(c, name) for c in items]
            return None if vals[0] is None else torch.cat(vals)

        return Conditioning(**{f.name: _cat(f.name) for f in fields(Conditioning)})

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor], prefix: str = "") -> Conditioning:
        return Conditioning(**{f.name: t.get(prefix + f.name) for f in fields(Conditioning)})


def sdxl_time_ids(resolution: int, n: int) -> torch.Tensor:
    """SDXL micro-conditioning: (original_size, crop_top_left, target_size) = (r, r, 0, 0, r, r)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(n, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser


@dataclass
class Denoiser:
    """A UNet seen through the teacher's schedule: `(x_t, t, cond) -> (x0, eps)`."""

    unet: torch.nn.Module
    schedule: NoiseSchedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.unet(x_t, t, **cond.unet_kwargs(), return_dict=False)[0]
        return self.schedule.to_x0_eps(out.to(x_t.dtype), x_t, t)

    def guided(self, x_t, t, cond: Conditioning, uncond: Conditioning, w: float):
        """CFG (TLCM eq. 8) in one batched forward pass; returns (x0, eps) of the guided prediction."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if w == 1.0:
            return self(x_t, t, cond)
        n = x_t.shape[0]
        if len(uncond) == 1 and n > 1:
            uncond = uncond.expand(n)
        _, eps = self(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        eps = cfg(eps[:n], eps[n:], w)
        a, s = self.schedule.coeffs(t, x_t)
        return (x_t - s * eps) / a, eps


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def resolve_teacher_source(teacher: TeacherConfig) -> str:
    """A local folder (the toy teacher, a path, a downloaded fsspec URL) or a hub id for from_pretrained."""
    world = teacher.toy_world
    if world is not None:
        from .toy import toy_teacher_path

        path = toy_teacher_path(world)
        if not (Path(path) / "model_index.json").is_file():
            raise TeacherError(f"the toy teacher for world {world!r} is not shipped at {path}; run `tlcm toy-teacher`")
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
    """What identifies the teacher's weights in fingerprints: content hashes where cheap, else id@revision."""
    src = resolve_teacher_source(teacher) if teacher.toy_world else teacher.source
    ident = {"source": teacher.source, "revision": teacher.revision, "variant": teacher.variant,
             "resolution": teacher.resolution}
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
    """Cheap checks before expensive work: the source resolves and names an SD/SDXL diffusers pipeline."""
    src = resolve_teacher_source(teacher)
    index = _model_index(src)
    if index is None:
        if Path(src).exists():
            raise TeacherError(f"teacher.source={teacher.source!r}: {src} has no model_index.json (not a diffusers "
                               "pipeline folder)")
        return src  # a hub id: checked when loaded
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise TeacherError(f"teacher.source={teacher.source!r} is a {cls}; supported: {', '.join(SUPPORTED_PIPELINES)} "
                           "(SDXL-shaped or SD 1.x/2.x)")
    for part in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        if part not in index:
            raise TeacherError(f"teacher.source={teacher.source!r}: the pipeline has no {part}")
    _check_teacher_shapes(teacher.source, src, index)
    return src


def _check_teacher_shapes(source: str, src: str, index: dict) -> None:
    """The components' configs fit together as SDXL (two text encoders, text_time conditioning) or SD 1.x/2.x;
    reads only the small config files, so a mismatched teacher fails before any weights load."""
    def config(part: str) -> dict:
        p = Path(src) / part / "config.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise TeacherError(f"teacher.source={source!r}: cannot read {p} ({type(e).__name__})") from None

    unet, vae, te = config("unet"), config("vae"), config("text_encoder")
    where = f"teacher.source={source!r} ({index.get('_class_name')})"
    if unet.get("in_channels") != vae.get("latent_channels", 4):
        raise TeacherError(f"{where}: the UNet takes {unet.get('in_channels')} channels but the VAE makes "
                           f"{vae.get('latent_channels', 4)}")
    xattn = unet.get("cross_attention_dim")
    xattn = set(xattn) if isinstance(xattn, list) else {xattn}
    if index.get("_class_name") == "StableDiffusionXLPipeline":
        if not index.get("text_encoder_2") or not index.get("tokenizer_2") or None in index["text_encoder_2"]:
            raise TeacherError(f"{where} is not SDXL-shaped: it has no second text encoder/tokenizer")
        if unet.get("addition_embed_type") != "text_time":
            raise TeacherError(f"{where} is not SDXL-shaped: its UNet has addition_embed_type="
                               f"{unet.get('addition_embed_type')!r}, SDXL needs 'text_time' (pooled text + size ids)")
        te2 = config("text_encoder_2")
        want = te.get("hidden_size", 0) + te2.get("hidden_size", 0)
        if xattn != {want}:
            raise TeacherError(f"{where} is not SDXL-shaped: UNet cross_attention_dim={unet.get('cross_attention_dim')}"
                               f" but the two text encoders give {te.get('hidden_size')} + {te2.get('hidden_size')}")
        pooled = te2.get("projection_dim", te2.get("hidden_size", 0))
        want = pooled + 6 * (unet.get("addition_time_embed_dim") or 0)
        if unet.get("projection_class_embeddings_input_dim") != want:
            raise TeacherError(f"{where} is not SDXL-shaped: UNet projection_class_embeddings_input_dim="
                               f"{unet.get('projection_class_embeddings_input_dim')}, expected pooled {pooled} + 6 x "
                               f"addition_time_embed_dim {unet.get('addition_time_embed_dim')} = {want}")
    elif xattn != {te.get("hidden_size")}:
        raise TeacherError(f"{where}: UNet cross_attention_dim={unet.get('cross_attention_dim')} does not match the "
                           f"text encoder's hidden_size={te.get('hidden_size')}")


def load_schedule(teacher: TeacherConfig) -> NoiseSchedule:
    from diffusers import DDIMScheduler

    src = resolve_teacher_source(teacher)
    config = DDIMScheduler.load_config(src, subfolder="scheduler", revision=teacher.revision)
    return NoiseSchedule.from_config(config)


def load_unet(teacher: TeacherConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """The teacher's UNet alone (the student starts from it; MLCD loads nothing else)."""
    from diffusers import UNet2DConditionModel

    quiet_hub_logging()
    src = resolve_teacher_source(teacher)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", revision=teacher.revision,
                                                variant=teacher.variant, dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def quiet_hub_logging() -> None:
    """Loading bars of diffusers/transformers say nothing useful in a pipeline log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(teacher: TeacherConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """The whole diffusers pipeline (text encoders, VAE, UNet); SDXL or SD 1.x/2.x."""
    from diffusers import DiffusionPipeline

    quiet_hub_logging()
    src = check_teacher(teacher)
    pipe = DiffusionPipeline.from_pretrained(src, revision=teacher.revision, variant=teacher.variant,
                                             dtype=dtype)
    if type(pipe).__name__ not in SUPPORTED_PIPELINES:
        raise TeacherError(f"teacher.source={teacher.source!r} loaded as {type(pipe).__name__}; "
                           f"supported: {', '.join(SUPPORTED_PIPELINES)}")
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    return pipe.to(device)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


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


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], resolution: int, batch_size: int = 64) -> tuple[Conditioning, Conditioning]:
    """Text conditioning for each prompt and the unconditional (batch of one), as the pipeline itself encodes them
    (SDXL: both encoders, pooled embedding, zeros for the empty prompt when force_zeros_for_empty_prompt)."""
    device = pipe.unet.device
    conds, uncond = [], None
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        if is_sdxl(pipe):
            pe, npe, pooled, npooled = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
            conds.append(Conditioning(pe, pooled, sdxl_time_ids(resolution, len(chunk)).to(device, pe.dtype)))
            uncond = Conditioning(npe[:1], npooled[:1], sdxl_time_ids(resolution, 1).to(device, pe.dtype))
        else:
            pe, npe = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=True)
            conds.append(Conditioning(pe))
            uncond = Conditioning(npe[:1])
    return Conditioning.cat(conds), uncond


def latent_shape(pipe_or_unet, resolution: int, vae_scale_factor: int | None = None) -> tuple[int, int, int]:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    f = vae_scale_factor or getattr(pipe_or_unet, "vae_scale_factor", None)
    if f is None:
        raise ValueError("vae_scale_factor unknown")
    if resolution % f:
        raise ValueError(f"teacher.resolution={resolution} is not divisible by the VAE factor {f}")
    return (unet.config.in_channels, resolution // f, resolution // f)


def vae_scale_factor_of(teacher: TeacherConfig) -> int:
    from diffusers import AutoencoderKL

    src = resolve_teacher_source(teacher)
    cfg_ = AutoencoderKL.load_config(src, subfolder="vae", revision=teacher.revision)
    return 2 ** (len(cfg_["block_out_channels"]) - 1)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W) float32."""
    return decode_latents_grad(pipe, latents)


def images_uint8(images: torch.Tensor):
    """Images in [0, 1], (B, 3, H, W) -> uint8 pixels (B, H, W, 3) as a numpy array: what every PNG, grid and image
    metric here sees."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")


def decode_latents_grad(pipe, latents: torch.Tensor) -> torch.Tensor:
    """As decode_latents, differentiable w.r.t. the latents (the VAE itself stays frozen)."""
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    img = vae.decode(z, return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


__all__ = [
    "Conditioning", "Denoiser", "TeacherError", "check_prompts", "check_teacher", "decode_latents",
    "encode_prompts", "is_sdxl", "latent_shape", "load_pipeline", "load_schedule", "load_unet",
    "resolve_device", "resolve_dtype", "resolve_teacher_source", "sdxl_time_ids", "setup_threads",
    "teacher_identity", "vae_scale_factor_of",
]


def schedule_of(pipe):
    from .schedule import NoiseSchedule

    return NoiseSchedule.from_config(dict(pipe.scheduler.config))


def load_vae(teacher, device: torch.device):
    """The teacher's AutoencoderKL alone, float32 (SDXL's VAE overflows in fp16), frozen."""
    from diffusers import AutoencoderKL

    quiet_hub_logging()
    src = resolve_teacher_source(teacher)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", revision=teacher.revision, dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False)


def vae_decoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents (UNet scale) -> images in [0, 1], as models.decode_latents (which only needs `.vae`)."""
    from types import SimpleNamespace

    holder = SimpleNamespace(vae=vae)
    return lambda z: decode_latents(holder, z.to(vae.device))


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """images in [0, 1] (N, 3, H, W) -> latents at the UNet's scale (the mean of the VAE posterior)."""
    p = next(vae.parameters())
    sf = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(p.device, p.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        out.append(((z - shift) * sf).float().cpu())
    return torch.cat(out)
