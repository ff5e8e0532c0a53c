"""The flow-teacher presets (configs/flux-dev.yaml, configs/sd35.yaml): their settings, the one-line preflight when
what they need is missing, and every stage but export through run_pipeline on the tiny FLUX.1-dev- and
SD3.5-shaped pipelines (tests/tiny_flow.py) saved as folders, the presets scaled down by overrides alone. Stage 3
runs DMD + GAN (the MPS reward has no weights offline), with gradient checkpointing on as the presets have it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_flow import MAX_SEQ, RES, tiny_flux, tiny_sd3

from tlcm_core.config import load_config
from tlcm_core.families import FLUX, SD3

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"flux-dev": ("flux", tiny_flux, FLUX), "sd35": ("sd3", tiny_sd3, SD3)}


def test_the_presets_hold_the_papers_settings_in_flow_time():
    flux, sd35 = load_config("flux-dev"), load_config("sd35")
    for cfg in (flux, sd35):
        assert (cfg.schedule.segments, cfg.schedule.skip, cfg.teacher.resolution) == (8, 20, 1024)
        assert (cfg.mlcd.iterations, cfg.mlcd.lr, cfg.lcd.iterations, cfg.lcd.lr) == (12000, 1e-4, 2000, 1e-5)
        assert (cfg.lcd_trajectories.q, cfg.lcd_trajectories.p) == (4, 3)
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (64, 8.0, "auto")
        assert (cfg.compute.dtype, cfg.compute.gradient_checkpointing) == ("bfloat16", True)
        assert cfg.mlcd.distance == cfg.lcd.distance == "huber"  # latent LPIPS reads 4-channel SD latents
        assert cfg.stages[-1] == "export" and cfg.evaluate.teacher_steps == [28]
        one, two = cfg.finetune.phase_configs()  # the paper's order: the reward alone, then DMD + GAN
        assert (one.reward_weight, one.dmd_weight, one.gan_weight, one.iterations) == (1.0, 0.0, 0.0, 500)
        assert (two.reward_weight, two.dmd_weight, two.gan_weight, two.iterations) == (0.0, 1.0, 1.0, 1000)
    assert (flux.teacher.source, flux.teacher.family, flux.schedule.guidance) == ("black-forest-labs/FLUX.1-dev",
                                                                                 "flux", 3.5)
    assert (sd35.teacher.source, sd35.teacher.family, sd35.schedule.guidance) == (
        "stabilityai/stable-diffusion-3.5-large", "sd3", 3.5)
    assert (flux.teacher.max_sequence_length, sd35.teacher.max_sequence_length) == (512, 256)


def _cli(*argv: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_flux_dev_says_in_one_line_what_it_needs_before_any_stage(tmp_path):
    """As the sdxl preset: the weights a later stage needs (the MPS reward of finetune's first phase, a pickle) are
    checked before the first stage runs, one `error:` line each, no traceback, Prefect never started."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    base = ["distill", "--config", "flux-dev", "--store", str(tmp_path / "store"), "--set",
            f"trajectories.prompts={prompts}"]
    for extra, says in (([], "finetune.reward_scorer=mps loads a pickled model; set finetune.allow_pickle=true"),
                        (["--set", "finetune.allow_pickle=true"],
                         "finetune.reward_model='./MPS_overall_checkpoint.pth': no such file")):
        r = _cli(*base, *extra, home=tmp_path / "prefect")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
        assert not (tmp_path / "prefect").exists()  # nothing ran


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for name, build, _ in PRESETS.values():
        build().save_pretrained(root / name)
    return root


def _scaled_down(preset: str, folder: Path, store: Path):
    """The preset with overrides only: the tiny teacher folder at its 32 px, toy prompts, a few samples and
    iterations, DMD + GAN in one finetune run (no phases: the reward phase needs the MPS weights) with the teacher's
    samples as the GAN's real side, no export (tests/test_flow_export.py)."""
    return load_config(preset, [
        f"teacher.source={folder}", f"teacher.resolution={RES}", f"teacher.max_sequence_length={MAX_SEQ}",
        f"store.url={store}", "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,finetune,evaluate]",
        "compute.device=cpu", "trajectories.prompts=toy", "trajectories.num_samples=16",
        "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=4", "mlcd.grad_accum=1", "lora.rank=4",
        "lcd_trajectories.num_samples=8", "lcd_trajectories.shard_size=8", "lcd_trajectories.batch_size=8",
        "lcd_trajectories.q=2", "lcd_trajectories.p=2", "lcd.iterations=2", "lcd.batch_size=4", "lcd.grad_accum=1",
        "finetune.phases=[]", "finetune.reward_weight=0", "finetune.iterations=2", "finetune.batch_size=2",
        "finetune.q=2", "finetune.log_every=1", "finetune.gan_real=teacher", "finetune.gan_real_pool=4",
        "finetune.gan_real_steps=3",
        "evaluate.num_samples=4", "evaluate.batch_size=4", "evaluate.steps=[1,2]", "evaluate.teacher_steps=[3]",
        "evaluate.grid_size=2", "evaluate.metrics.kind=none"])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_scaled_down_preset_runs_every_stage_but_export(preset, folders, tmp_path):
    from tlcm_core.pipeline import open_store, run_pipeline
    from tlcm_core.progress import SilentReporter

    name, _, family = PRESETS[preset]
    cfg = _scaled_down(preset, folders / name, tmp_path)
    assert cfg.compute.gradient_checkpointing and cfg.mlcd.distance == "huber"  # kept from the preset
    res = {r.stage: r for r in run_pipeline(cfg, reporter=SilentReporter())}
    assert list(res) == ["teacher-trajectories", "mlcd", "lcd-trajectories", "lcd", "finetune", "teacher-evaluate",
                         "evaluate"]
    for stage in ("mlcd", "lcd"):
        assert math.isfinite(res[stage].summary["final_loss"])
    ft = res["finetune"].summary
    assert ft["terms"] == ["dmd", "gan"] and all(math.isfinite(ft["final"][k]) for k in ("dmd", "gan_g", "gan_d",
                                                                                        "fake"))
    store = open_store(cfg)
    lora = {s: store.artifact(s, res[s].fingerprint).load_tensors("lora.safetensors") for s in ("lcd", "finetune")}
    assert lora["lcd"].keys() == lora["finetune"].keys()
    assert all(k.startswith(f"{family.network_part}.") for k in lora["finetune"])
    assert all(torch.isfinite(v).all() for v in lora["finetune"].values())
    assert any(not torch.equal(lora["lcd"][k], lora["finetune"][k]) for k in lora["lcd"])  # stage 3 moved it
    rows = res["evaluate"].summary["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("teacher-euler", 3), ("tlcm-renoise", 1),
                                                         ("tlcm-renoise", 2)]
    assert store.artifact("finetune", res["finetune"].fingerprint).exists_file("gan_real_pool.safetensors")
