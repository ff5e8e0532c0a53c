"""Declarations several stages share: what every training stage reads, and how a stage finds its LoRA input.
(Not a stage: a stage module may import this, never another stage module.)"""

from __future__ import annotations

from typing import Callable

from ..config import PipelineConfig

# the config paths every training stage's output depends on besides its own section (compute.dtype matters on GPUs,
# compute.num_processes is the data-parallel world size, compute.lora_forward the float rounding); the consistency
# trainers also read compute.cpu_processes
TRAINER_READS = ("teacher", "lora", "compute.seed", "compute.dtype", "compute.num_processes", "compute.lora_forward")
LORA_STAGES = ("mlcd", "lcd", "finetune")


def trainer_reads(section: str) -> Callable[[PipelineConfig], tuple[str, ...]]:
    """A consistency trainer's hashed reads: its section, TRAINER_READS, and the latent LPIPS weights file when
    that is its distance (other latent LPIPS sources arrive as an input artifact, hashed by fingerprint)."""

    def f(cfg: PipelineConfig) -> tuple[str, ...]:
        file = getattr(cfg, section).distance == "latent-lpips" and cfg.latent_lpips.source == "file"
        return (section, *TRAINER_READS, "compute.cpu_processes", *(("latent_lpips.weights",) if file else ()))

    return f


def trainer_uses(section: str) -> tuple[str, ...]:
    """A trainer section's bookkeeping fields and gradient checkpointing (read, never hashed: they do not change the
    weights), and the latent LPIPS settings the distance reads (hashed through `trainer_reads` or the input
    artifact)."""
    return (*(f"{section}.{f}" for f in ("log_every", "checkpoint_every", "prefetch")), "latent_lpips",
            "compute.gradient_checkpointing")


def with_latent_lpips(section: str, inputs: dict[str, str]) -> Callable[[PipelineConfig], dict[str, str]]:
    """A trainer whose distance is latent-lpips also reads the latent-lpips artifact (unless the weights are a
    file, which latent_lpips.weights names and the fingerprint hashes)."""

    def f(cfg: PipelineConfig) -> dict[str, str]:
        if getattr(cfg, section).distance == "latent-lpips" and cfg.latent_lpips.source != "file":
            return {**inputs, "lpips": "latent-lpips"}
        return dict(inputs)

    return f


def final_lora_stage(cfg: PipelineConfig, before: str = "evaluate") -> str | None:
    """The last LoRA-producing stage of the configured pipeline before `before` (None: no LoRA, the teacher)."""
    upto = cfg.stages[: cfg.stages.index(before)] if before in cfg.stages else cfg.stages
    lora = [s for s in upto if s in LORA_STAGES]
    return lora[-1] if lora else None

