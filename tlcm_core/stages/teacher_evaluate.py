"""Stage `teacher-evaluate`: the teacher's rows of `evaluate` (its own baseline sampler at evaluate.teacher_steps,
the FID reference row first: DDIM + CFG on trailing timesteps for SD/SDXL, Euler on the stock pipeline's shifted
sigma grid with its guidance for FLUX.1 and SD3), sampled once and cached: they depend on the teacher and the
evaluation protocol only, so every LoRA compared on the same protocol (evaluate.steps, evaluate.sampler, another
LoRA) reuses them.

The artifact holds the rows (metrics.json, metrics.md), their grids, the teacher images the side-by-side grid shows
and, with evaluate.metrics.fid_reference=teacher, FID's reference statistics (tlcm_core/evaluation.py: TeacherRows).
"""

from __future__ import annotations

from ..evaluation import (save_teacher_rows, teacher_guidance_reads, teacher_row_steps, teacher_rows,
                          uses_captions)
from ..stage import Stage, StageContext
from .common import final_lora_stage

# evaluate's fields that shape the teacher's rows; evaluate.steps only when there is no LoRA (then the teacher's
# rows are at evaluate.steps), never evaluate.sampler (the student's)
EVALUATE_FIELDS = ("num_samples", "batch_size", "seed", "grid_size", "metrics")


def run(ctx: StageContext) -> dict:
    cfg, reporter = ctx.cfg, ctx.reporter
    steps = teacher_row_steps(cfg, with_lora=final_lora_stage(cfg) is not None)
    t = teacher_rows(cfg, steps, reporter)
    save_teacher_rows(ctx.out, t)
    for name, png in t.grids.items():
        reporter.image(f"grid-{name}", png, description=f"samples: {name}")
    reporter.table("teacher-metrics", t.rows, description="the teacher's rows (its baseline sampler)")
    return {"rows": t.rows}


def _reads(cfg) -> tuple[str, ...]:
    steps = "evaluate.teacher_steps" if final_lora_stage(cfg) is not None else "evaluate.steps"
    # evaluation prompts: the captions file, else the toy world's prompts, else the training prompts
    prompts = () if uses_captions(cfg) or cfg.teacher.toy_world else ("trajectories.prompts",)
    return ("teacher", steps, *(f"evaluate.{f}" for f in EVALUATE_FIELDS), *teacher_guidance_reads(cfg),
            "compute.dtype", "compute.cpu_dtype", *prompts)


# implied: run with the pipeline whenever evaluate takes it as an input, whether or not `stages` lists it;
# `stages` (which of evaluate.teacher_steps / evaluate.steps are the teacher's rows) is hashed through `_reads`
STAGE = Stage("teacher-evaluate", version=1, run=run, reads=_reads, uses=("stages",), implied=True)
