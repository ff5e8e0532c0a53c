"""`tlcm generate`: images from a TLCM LoRA, through the base's stock diffusers pipeline with the TLCM scheduler:
`TLCMScheduler` for SD/SDXL UNets, `FlowMatchTLCMScheduler` for FLUX.1 (`FluxPipeline`) and SD3
(`StableDiffusion3Pipeline`), sampled at guidance 0 (UNet) or `guidance_scale=1` (flow: no CFG batch; FLUX.1-dev's
guidance embedding at 1.0, the value the student was distilled with).

The base model comes from the LoRA's metadata (`base_model`, written by every training stage) or is given
explicitly. Image i of a call uses its own generator seeded `seed + i`, for its starting noise and every re-noising
draw (a flow pipeline passes no generator to its scheduler: the generators go in through
`FlowMatchTLCMScheduler.set_noise_generator`), so an image does not depend on the batch it was generated in (up to
the float rounding of batched kernels); with the same noise the UNet pipeline reproduces
`tlcm_core.samplers.tlcm_sample` exactly (tests/test_generate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import LoRAConfig, TeacherConfig
from .families import family_of
from .lora import ADAPTER, LoRAError, LoRAFile, load_lora_into, merge_lora, read_lora


def base_teacher(lora: LoRAFile, base: str | None = None, resolution: int | None = None) -> TeacherConfig:
    """The base model to generate with: `base` if given, else the one recorded in the LoRA's metadata."""
    saved = lora.base
    if base is None and not saved.get("source"):
        raise LoRAError(f"{lora.url}: its metadata names no base model; pass the base explicitly (--base)")
    if base is not None:  # taken as given
        return TeacherConfig(source=base, resolution=resolution or saved.get("resolution") or 1024)
    return TeacherConfig(source=saved["source"], revision=saved.get("revision"), variant=saved.get("variant"),
                         resolution=resolution or saved.get("resolution") or 1024,
                         max_sequence_length=saved.get("max_sequence_length"))


def check_base(lora: LoRAFile, teacher: TeacherConfig) -> None:
    """Refuse a base whose identity (content hash where recorded) differs from the one the LoRA was trained on."""
    from .models import teacher_identity

    now = teacher_identity(teacher)
    keys = [k for k in ("source", "revision", "variant", "content") if k in lora.base or k in now]
    if any(lora.base.get(k) != now.get(k) for k in keys):
        raise LoRAError(f"{lora.url} was trained on {lora.base} but the base model now is {now} (e.g. a retrained toy "
                        "teacher); pass --base explicitly to generate with it anyway")


def tlcm_pipeline(teacher: TeacherConfig, lora_state: dict[str, torch.Tensor], lora: LoRAConfig, *,
                  segments: int = 8, sampler: str = "renoise", milestone_grid: str = "official",
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  extra_loras: Sequence[tuple[Any, float]] = ()):
    """The base pipeline with the LoRA loaded (as in training: PEFT adapter `tlcm`), merged into the network's
    weights (UNet or transformer) for sampling speed, and the TLCM scheduler of its family.

    `extra_loras`: (LoRA, weight) pairs stacked on the TLCM LoRA, e.g. `[("style.safetensors", 0.8)]` (see
    `stack_loras`); they are merged into the network with their weights too."""
    from .config import ComputeConfig
    from .flow_scheduler import FlowMatchTLCMScheduler
    from .models import load_pipeline, resolve_device, resolve_dtype
    from .scheduler import TLCMScheduler

    device = torch.device(device) if device is not None else resolve_device(ComputeConfig())
    dtype = dtype or resolve_dtype(ComputeConfig(dtype="float16"), device)
    pipe = load_pipeline(teacher, device, dtype)
    family = family_of(pipe)
    net = family.network(pipe)
    load_lora_into(net, lora_state, lora)
    for name in stack_loras(pipe, extra_loras):
        merge_lora(net, name)
    scheduler = TLCMScheduler if family.name == "unet" else FlowMatchTLCMScheduler
    pipe.scheduler = scheduler.from_base(pipe.scheduler.config, segments=segments, sampler=sampler,
                                         milestone_grid=milestone_grid)
    return pipe


def stack_loras(pipe, extra_loras: Sequence[tuple[Any, float]]) -> list[str]:
    """Load more LoRAs (a style LoRA, ...) next to the TLCM LoRA (adapter `tlcm`, weight 1) with diffusers'
    `load_lora_weights`, as adapters `extra_0`, `extra_1`, ... at their weights. Each LoRA is what that takes (a
    diffusers or kohya file, a folder holding one, a hub id, a state dict). Returns the adapter names, `tlcm` first.
    Layers of the text encoders (if a LoRA has them) stay unmerged adapters."""
    from pathlib import Path

    names, weights = [ADAPTER], [1.0]
    for i, (ref, weight) in enumerate(extra_loras):
        kw = {}
        if isinstance(ref, (str, Path)) and Path(ref).is_file():  # a file: its folder and name
            ref, kw = str(Path(ref).parent), {"weight_name": Path(ref).name}
        names.append(f"extra_{i}")
        weights.append(float(weight))
        pipe.load_lora_weights(str(ref) if isinstance(ref, Path) else ref, adapter_name=names[-1], **kw)
    if len(names) > 1:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


@torch.no_grad()
def generate(base: str | TeacherConfig | None, lora_state: dict[str, torch.Tensor], prompts: list[str], steps: int,
             seed: int, *, lora: LoRAConfig, resolution: int | None = None, segments: int = 8,
             sampler: str = "renoise", milestone_grid: str = "official", batch_size: int = 8,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None, output_type: str = "pil",
             pipe=None):
    """Images (PIL, or latents with output_type="latent") for `prompts`; image i from generator seed + i.

    `pipe` reuses a pipeline from `tlcm_pipeline` (then base/lora_state/segments/sampler/milestone_grid are not read
    again).
    """
    if not prompts:
        raise ValueError("no prompts to generate")
    teacher = base if isinstance(base, TeacherConfig) else TeacherConfig(source=base) if base is not None else None
    if pipe is None:
        pipe = tlcm_pipeline(teacher, lora_state, lora, segments=segments, sampler=sampler,
                             milestone_grid=milestone_grid, device=device, dtype=dtype)
    flow = family_of(pipe).name != "unet"
    # default size: the base's own (what its pipeline would use), e.g. 1024 for SDXL and FLUX, 32 for the toy world
    res = resolution or (teacher.resolution if isinstance(base, TeacherConfig) else None) or \
        (pipe.default_sample_size if flow else pipe.unet.config.sample_size) * pipe.vae_scale_factor
    # the LoRA is guidance-distilled: UNet guidance 0; flow guidance_scale 1, no CFG batch (FLUX.1-dev: its guidance
    # embedding at 1.0, the value the student was distilled with), and the T5 length it was trained with
    kw: dict = {"guidance_scale": 1.0 if flow else 0.0}
    if flow and teacher is not None and teacher.max_sequence_length:
        kw["max_sequence_length"] = teacher.max_sequence_length
    images: list = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        if flow:  # these pipelines never pass their generator to the scheduler's step
            pipe.scheduler.set_noise_generator(gens)
        out = pipe(prompt=chunk, num_inference_steps=steps, generator=gens, height=res, width=res,
                   output_type=output_type, **kw).images
        images.extend(out if output_type == "pil" else list(out))
    return images if output_type == "pil" else torch.stack(images)


def upscale_for_viewing(image, min_side: int = 256, factor: int = 0):
    """Nearest-neighbour upscale so tiny (toy) images are big enough to look at; factor 0 = automatic."""
    from PIL import Image

    k = factor or max(1, -(-min_side // min(image.size)))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


def image_grid(images: list, cols: int = 8):
    from PIL import Image

    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + 2), rows * (h + 2)), (0, 0, 0))
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(im, (c * (w + 2) + 1, r * (h + 2) + 1))
    return grid


__all__ = ["LoRAFile", "base_teacher", "check_base", "generate", "image_grid", "read_lora", "stack_loras",
           "tlcm_pipeline", "upscale_for_viewing"]
