"""Stage `evaluate`: student rows for evaluate.steps, sample grids, and the metrics table (toy metrics in a toy
world; CLIP score, aesthetic score, ImageReward and FID for real teachers; tlcm_core/evaluation.py). The teacher's
rows (evaluate.teacher_steps, and the FID reference row with fid_reference=teacher) come sampled from the
`teacher-evaluate` artifact, merged first into the table, the grids and the side-by-side; this stage never samples
the teacher, so comparing LoRAs on one protocol samples the teacher once."""

from __future__ import annotations

from ..evaluation import (TeacherRows, evaluate_rows, grid_file, load_teacher_rows, markdown_table, side_by_side_png,
                          teacher_row_steps, uses_captions)
from ..lora import read_lora
from ..models import teacher_identity
from ..plots import metrics_vs_steps_png
from ..stage import Stage, StageContext
from .common import final_lora_stage

SIDE_BY_SIDE = "grids/side-by-side.png"  # what the run report shows (tlcm_core/report.py)
METRICS_PLOT = "plots/metrics.png"


def run(ctx: StageContext) -> dict:
    cfg, out_art, reporter, lora_art = ctx.cfg, ctx.out, ctx.reporter, ctx.inputs.get("lora")
    lora = read_lora(lora_art, cfg.lora, teacher_identity(cfg.teacher)).state if lora_art is not None else None
    grids: dict[str, bytes] = {}
    samples: dict = {}
    # no teacher input: no teacher rows asked for (empty rows, so the teacher is never sampled here either)
    teacher = load_teacher_rows(ctx.inputs["teacher"]) if "teacher" in ctx.inputs else TeacherRows([], {}, {})
    rows = evaluate_rows(cfg, lora, cfg.evaluate.steps, reporter, grids=grids, samples=samples, teacher=teacher)
    out_art.write_json("metrics.json", rows)
    out_art.write_bytes("metrics.md", (markdown_table(rows) + "\n").encode())
    for name, png in grids.items():  # the teacher's grids too (copied): the artifact shows the whole table
        out_art.write_bytes(grid_file(name), png)
        reporter.image(f"grid-{name}", png, description=f"samples: {name}")
    side = side_by_side_png(samples)  # the teacher at its most steps above the student at 2 and 4, same noise
    if side is not None:
        out_art.write_bytes(SIDE_BY_SIDE, side)
        reporter.image("side-by-side", side, description="same prompts, same starting noise: teacher vs student")
    plot = metrics_vs_steps_png(rows, title=f"evaluate: {rows[0]['samples']} samples per row" if rows else "")
    out_art.write_bytes(METRICS_PLOT, plot)
    reporter.image("metrics-plot", plot, description="metrics against sampling steps")
    reporter.table("metrics", rows, description=f"evaluate ({lora_art.uri if lora_art else 'teacher only'})")
    return {"rows": rows}


def _inputs(cfg) -> dict[str, str]:
    stage = final_lora_stage(cfg)
    teacher = {"teacher": "teacher-evaluate"} if teacher_row_steps(cfg, with_lora=stage is not None) else {}
    return {"lora": stage, **teacher} if stage else teacher


def _reads(cfg) -> tuple[str, ...]:
    # evaluation prompts: the captions file, else the toy world's prompts, else the training prompts
    prompts = () if uses_captions(cfg) or cfg.teacher.toy_world else ("trajectories.prompts",)
    return ("teacher", "evaluate", "schedule", "lora", "compute.dtype", "compute.cpu_dtype", *prompts)


# version 3: the side-by-side grid and the metrics plot; 4: the teacher's rows from the teacher-evaluate artifact;
# 5: the student rows' `timesteps` (evaluate.milestone_grid)
STAGE = Stage("evaluate", version=5, run=run, inputs=_inputs, reads=_reads)
