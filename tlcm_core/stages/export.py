"""Stage `export`: the final LoRA as the files other programs load -- diffusers, kohya/ComfyUI and PEFT LoRAs (all
three by default), a ComfyUI workflow beside the kohya file, the TLCMScheduler config and a model card (the formats
themselves: tlcm_core/lora_files.py); for a FLUX.1 / SD3 teacher the same formats under the transformer's names,
FlowMatchTLCMScheduler and no workflow. Version 3: kohya/modelspec metadata and the ComfyUI workflow (a UNet's files
are unchanged since; flow teachers were refused before)."""

from __future__ import annotations

from ..lora import read_lora
from ..lora_files import base_configs, export_files
from ..models import teacher_identity
from ..stage import Stage, StageContext
from .common import final_lora_stage


def run(ctx: StageContext) -> dict:
    cfg, out_art, reporter = ctx.cfg, ctx.out, ctx.reporter
    lora_art, metrics_art = ctx.inputs["lora"], ctx.inputs.get("metrics")
    found = read_lora(lora_art, cfg.lora, teacher_identity(cfg.teacher))
    state, metadata = found.state, found.metadata
    unet_config, sched_config = base_configs(cfg.teacher)  # a flow teacher's: its transformer's config
    manifest = lora_art.manifest(verify="none")
    training = {"stage": manifest.stage, "artifact": lora_art.uri, "config": manifest.config,
                "inputs": manifest.inputs, "summary": manifest.summary}
    metrics = metrics_art.read_json("metrics.json") if metrics_art is not None else None
    ex = cfg.export
    files = export_files(state, metadata, list(ex.formats), unet_config, sched_config,
                         segments=cfg.schedule.segments, sampler=ex.sampler, steps=ex.steps,
                         milestone_grid=ex.milestone_grid,
                         kohya_naming=ex.kohya_naming, training=training, metrics=metrics, where=lora_art.uri)
    for rel, data in files.items():
        out_art.write_bytes(rel, data)
    reporter.log(f"export: {', '.join(sorted(files))}")
    return {"formats": list(ex.formats), "files": sorted(files), "lora": lora_art.uri,
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha}


def _inputs(cfg) -> dict[str, str]:
    stage = final_lora_stage(cfg, before="export")
    if stage is None:
        raise ValueError("stage 'export' needs a LoRA stage (mlcd, lcd or finetune) before it in stages")
    return {"lora": stage, **({"metrics": "evaluate"} if "evaluate" in cfg.stages else {})}


# version 4: the scheduler config records export.milestone_grid
STAGE = Stage("export", version=4, run=run, inputs=_inputs, reads=("teacher", "export", "schedule", "lora"))
