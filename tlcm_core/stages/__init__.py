"""The stages, one module each; each module ends with its `STAGE` declaration (tlcm_core/stage.py).

| stage                | module                     |
|----------------------|----------------------------|
| teacher-trajectories | stages/teacher_trajectories.py |
| latent-lpips         | stages/latent_lpips.py     |
| mlcd                 | stages/mlcd.py             |
| lcd-trajectories     | stages/lcd_trajectories.py |
| lcd                  | stages/lcd.py              |
| finetune             | stages/finetune.py         |
| teacher-evaluate     | stages/teacher_evaluate.py |
| evaluate             | stages/evaluate.py         |
| export               | stages/export.py           |

A stage module imports the library (tlcm_core/*.py) and stages/common.py, never another stage module.
"""

from __future__ import annotations

from ..config import STAGES
from ..stage import Stage
from . import (common, evaluate, export, finetune, latent_lpips, lcd, lcd_trajectories, mlcd, teacher_evaluate,
               teacher_trajectories)

REGISTRY: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in (
    teacher_trajectories, latent_lpips, mlcd, lcd_trajectories, lcd, finetune, teacher_evaluate, evaluate, export)}

assert tuple(REGISTRY) == STAGES, "config.STAGES (the dependency order) and the stage modules disagree"
# common.LORA_STAGES lets a stage's `inputs` find the last LoRA before it without importing the other stage modules
assert common.LORA_STAGES == tuple(n for n, s in REGISTRY.items() if s.makes_lora), \
    "stages/common.py LORA_STAGES and the stages' makes_lora declarations disagree"

__all__ = ["REGISTRY"]
