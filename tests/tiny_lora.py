"""Shared by test_export / test_generate / test_compat: a tiny random SDXL-shaped base model saved once per test
process, a "trained-looking" TLCM LoRA on it (random non-zero lora_B, alpha != rank so a lost scale shows), and the
in-training reference sampler (tlcm_core.lora.load_lora_into + tlcm_sample) every round trip is compared with."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from tlcm_core.config import LoRAConfig, TeacherConfig
from tlcm_core.lora import attach_lora, load_lora_into, lora_metadata, lora_state_dict
from tlcm_core.models import Denoiser, encode_prompts, load_pipeline, teacher_identity
from tlcm_core.samplers import student_x0_fn, tlcm_sample
from tlcm_core.schedule import NoiseSchedule, milestones, sampler_timesteps

PROMPTS = ["a red circle", "a blue square"]
LORA = LoRAConfig(rank=4, alpha=8)  # scale 2: a loader that drops alpha (takes alpha = rank) is caught
CPU = torch.device("cpu")


@functools.cache
def base_path() -> str:
    from tlcm_core.toy.pipeline import build_toy_pipeline

    d = tempfile.mkdtemp(prefix="tlcm-tiny-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    path = Path(d) / "tiny-sdxl"
    build_toy_pipeline(seed=7).save_pretrained(path)
    return str(path)


def teacher(resolution: int = 32) -> TeacherConfig:
    return TeacherConfig(source=base_path(), resolution=resolution)


def fresh_pipe(resolution: int = 32):
    return load_pipeline(teacher(resolution), CPU)


@functools.cache
def _lora(seed: int, rank: int, alpha: float, std: float) -> tuple[dict, dict]:
    lcfg = LoRAConfig(rank=rank, alpha=alpha)
    unet = fresh_pipe().unet
    attach_lora(unet, lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return lora_state_dict(unet), lora_metadata(lcfg, teacher_identity(teacher()))


def trained_lora(seed: int = 0, lora: LoRAConfig = LORA, std: float = 0.05) -> tuple[dict, dict]:
    """(state, metadata) of a TLCM LoRA file for the tiny base."""
    state, meta = _lora(seed, lora.rank, lora.alpha, std)
    return dict(state), dict(meta)


def reference_latents(state: dict, steps: int, seed: int, prompts=PROMPTS, resolution: int = 32,
                      mode: str = "renoise", lora: LoRAConfig = LORA, pipe=None) -> torch.Tensor:
    """What the project itself samples with the in-training LoRA: x_T and re-noising from one CPU generator."""
    pipe = pipe or fresh_pipe(resolution)
    if "tlcm" not in getattr(pipe.unet, "peft_config", {}):
        load_lora_into(pipe.unet, state, lora)
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    cond, _ = encode_prompts(pipe, list(prompts), resolution)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), 4, resolution // 2, resolution // 2), generator=g)
    return tlcm_sample(student_x0_fn(Denoiser(pipe.unet, schedule), cond), x_T,
                       sampler_timesteps(steps, milestones(1000, 8)), schedule, mode=mode, generator=g)


def pipeline_latents(pipe, steps: int, seed: int, prompts=PROMPTS, resolution: int = 32, **kw) -> torch.Tensor:
    """The same through a diffusers pipeline (whatever LoRA and scheduler it holds), one CPU generator."""
    return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=0.0, height=resolution,
                width=resolution, generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images


def diffusers_export(out) -> Path:
    """The tiny trained LoRA exported in the diffusers layout (what stock pipelines load) into folder `out`."""
    from tlcm_core.lora_files import base_configs, export_files, write_files

    state, meta = trained_lora()
    write_files(export_files(state, meta, ["diffusers"], *base_configs(teacher()), segments=8), str(out))
    return Path(out)
