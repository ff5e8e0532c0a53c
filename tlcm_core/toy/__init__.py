"""The toy world: procedural text-image data, a tiny SDXL-shaped teacher (and an SD3-shaped flow teacher), an evaluator (accuracy,
Frechet distance, differentiable reward). Shipped trained artifacts live under ``TOY_ASSETS/<world>/``."""

from pathlib import Path

from .data import WORLDS, World, get_world, world_names
from .evaluator import ToyEvaluator, frechet_distance, train_evaluator
from .pipeline import build_toy_pipeline
from .teacher import ToyTeacherSettings, train_toy_teacher
from .tokenizer import build_tokenizer

TOY_ASSETS = Path(__file__).parent / "assets"


def toy_teacher_path(world: str = "toy", kind: str = "unet") -> Path:
    """The shipped diffusers folder of the world's trained teacher: "unet" a StableDiffusionXLPipeline, "flow" a
    StableDiffusion3Pipeline (flow matching)."""
    return TOY_ASSETS / world / ("teacher" if kind == "unet" else f"teacher-{kind}")


def toy_evaluator_path(world: str = "toy") -> Path:
    return TOY_ASSETS / world / "evaluator.safetensors"


__all__ = [
    "TOY_ASSETS",
    "WORLDS",
    "World",
    "ToyEvaluator",
    "ToyTeacherSettings",
    "build_tokenizer",
    "build_toy_pipeline",
    "frechet_distance",
    "get_world",
    "toy_evaluator_path",
    "toy_teacher_path",
    "train_evaluator",
    "train_toy_teacher",
    "world_names",
]
