"""Model families: the layer below the stages that knows how each kind of teacher is loaded, called and guided.

  unet  SD 1.x/2.x, SDXL       UNet2DConditionModel, DDPM time        tlcm_core/families/unet.py
  flux  FLUX.1                 FluxTransformer2DModel, flow time      tlcm_core/families/flux.py
  sd3   SD3 / SD3.5            SD3Transformer2DModel, flow time       tlcm_core/families/sd3.py

`teacher.family` picks one (auto: from model_index.json's `_class_name`); a loaded pipeline or a bare network knows
its family by its class (`family_of`). The interface is `ModelFamily` (tlcm_core/families/base.py).
"""

from __future__ import annotations

from .base import ModelFamily, TeacherError, vae_scale_factor, vae_scale_shift
from .flux import FLUX, FluxFamily
from .sd3 import SD3, SD3Family
from .unet import UNET, UNetFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (UNET, FLUX, SD3)}


def supported_pipelines() -> str:
    return ", ".join(f"{c} ({f.name})" for f in FAMILIES.values() for c in f.pipeline_classes)


def family_of_pipeline_class(cls: str | None) -> ModelFamily | None:
    return next((f for f in FAMILIES.values() if cls in f.pipeline_classes), None)


def family_of(obj) -> ModelFamily:
    """The family of a loaded pipeline or of a bare network, by class name. Anything else (a test's stand-in
    network, a wrapped UNet) is taken as a UNet, as every denoiser was before the families."""
    cls = type(obj).__name__
    return next((f for f in FAMILIES.values() if cls in f.pipeline_classes or cls in f.network_classes), UNET)


def resolve_family(requested: str, pipeline_class: str | None, where: str) -> ModelFamily:
    """The family `teacher.family` names, checked against the pipeline class when it is known; `auto` detects it.
    Raises one TeacherError naming what is supported."""
    detected = family_of_pipeline_class(pipeline_class) if pipeline_class is not None else None
    if pipeline_class is not None and detected is None:
        raise TeacherError(f"{where} is a {pipeline_class}; supported: {supported_pipelines()}")
    if requested == "auto":
        if detected is None:
            raise TeacherError(f"{where}: cannot tell its model family without its model_index.json; set "
                               f"teacher.family to one of {', '.join(FAMILIES)}")
        return detected
    family = FAMILIES[requested]
    if detected is not None and detected is not family:
        raise TeacherError(f"{where} is a {pipeline_class} ({detected.name}), but teacher.family={requested!r}; "
                           f"set teacher.family=auto or {detected.name}")
    return family


__all__ = ["FAMILIES", "FLUX", "FluxFamily", "ModelFamily", "SD3", "SD3Family", "TeacherError", "UNET", "UNetFamily",
           "family_of", "family_of_pipeline_class", "resolve_family", "supported_pipelines", "vae_scale_factor",
           "vae_scale_shift"]
