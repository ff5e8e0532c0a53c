"""What a person looks at after a run: loss curves, metrics against steps, the side-by-side grid and the run report
(tlcm_core/plots.py, tlcm_core/report.py, `tlcm report`), and that a flow run shows them in a real Prefect server.

One tiny toy run (module fixture, ~30 s on 2 cores) serves the report and CLI tests; the integration test copies its
store and reruns MLCD + evaluate as a `tlcm distill` against a Prefect server started by `tlcm stack up`.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tlcm_core.config import load_config
from tlcm_core.evaluation import markdown_table, round_sig, side_by_side_names, side_by_side_png
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.plots import PNG_SIGNATURE, loss_curves_png, loss_terms, metrics_vs_steps_png
from tlcm_core.progress import SilentReporter
from tlcm_core.report import NoFinishedRun, build_report

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["compute.device=cpu", "trajectories.num_samples=64", "trajectories.shard_size=32", "mlcd.iterations=6",
             "mlcd.log_every=2", "mlcd.checkpoint_every=100", "evaluate.steps=[1,2,4]", "evaluate.teacher_steps=[25]",
             "evaluate.num_samples=8", "evaluate.batch_size=8", "evaluate.grid_size=6"]
FINETUNE_LOG = [{"step": s, "loss": 1.0 / s, "reward": -0.5 + 0.01 * s, "dmd": 0.1 / s, "gan_g": 0.7, "fake": 0.2,
                 "gan_d": 1.3 - 0.01 * s, "lr": 1e-5, "elapsed_s": 0.1 * s} for s in range(2, 21, 2)]


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    return Image.open(io.BytesIO(png)).size


def eval_rows() -> list[dict]:
    teacher = [{"method": "teacher-ddim-cfg", "steps": s, "samples": 64, "prompt_accuracy": a, "frechet": f,
                "accuracy_ci95": [a - 0.05, min(1.0, a + 0.05)], "seconds_per_image": 0.01 * s}
               for s, a, f in ((2, 0.66, 1316.0), (25, 0.957, 304.0))]
    student = [{"method": "tlcm-renoise", "steps": s, "samples": 64, "prompt_accuracy": a, "frechet": f,
                "accuracy_ci95": [a - 0.05, min(1.0, a + 0.05)], "seconds_per_image": 0.01 * s}
               for s, a, f in ((1, 0.5, 900.0), (2, 0.9, 450.0), (4, 0.93, 380.123456), (8, 0.94, 350.0))]
    return teacher + student


# ------------------------------------------------------------------------------------------------ plots


def test_loss_curves_have_one_panel_per_finetune_term_and_are_pngs():
    assert loss_terms(FINETUNE_LOG) == ["loss", "reward", "dmd", "gan_g", "fake", "gan_d"]
    six = loss_curves_png(FINETUNE_LOG, "finetune: training loss")
    one = loss_curves_png([{k: r[k] for k in ("step", "loss", "lr")} for r in FINETUNE_LOG], "mlcd: training loss")
    (w6, h6), (w1, h1) = png_size(six), png_size(one)
    assert w6 > w1 and h6 > h1  # 3 x 2 panels against one
    assert 300 <= w1 <= 1000 and 200 <= h1 <= 600
    assert png_size(loss_curves_png([], "empty")) == png_size(one)  # no log rows: an empty panel, not an error


def test_metrics_against_steps_plot_the_field_metrics_when_present():
    toy = metrics_vs_steps_png(eval_rows(), "toy")
    real = [{"method": r["method"], "steps": r["steps"], "fid": r["frechet"] / 10, "clip_score": 0.3,
             "aesthetic_score": 5.5, "image_reward": 0.1} for r in eval_rows()]
    (wt, ht), (wr, hr) = png_size(toy), png_size(metrics_vs_steps_png(real))
    assert wr > wt  # four panels (FID, CS, AS, IR) against two (accuracy, Frechet)
    assert 600 <= wt <= 1200 and 250 <= ht <= 600 and ht <= hr <= 2 * ht  # at most two rows of panels


def test_tables_keep_four_significant_digits():
    assert round_sig({"a": 380.123456, "b": [0.000150349, 1.0], "c": 7, "d": "x"}) == \
        {"a": 380.1, "b": [0.0001503, 1.0], "c": 7, "d": "x"}
    md = markdown_table(eval_rows())
    assert "| tlcm-renoise | 4 | 0.93 | [0.88, 0.98] | 380.1 | 0.04 |" in md


def test_side_by_side_shows_the_teacher_at_most_steps_above_the_student_at_2_and_4():
    import torch

    names = ["teacher-ddim-cfg@2", "teacher-ddim-cfg@25", "tlcm-renoise@1", "tlcm-renoise@2", "tlcm-renoise@4"]
    assert side_by_side_names(names) == ["teacher-ddim-cfg@25", "tlcm-renoise@2", "tlcm-renoise@4"]
    assert side_by_side_names(["teacher-ddim-cfg@2", "tlcm-renoise@1", "tlcm-renoise@8"]) == \
        ["teacher-ddim-cfg@2", "tlcm-renoise@1", "tlcm-renoise@8"]
    prompts = ["a red circle", "a very long prompt that cannot fit in one cell of the grid at all"] * 4
    samples = {n: (torch.rand(8, 3, 32, 32), prompts) for n in names}
    w, h = png_size(side_by_side_png(samples, cols=6, cell=128))
    assert h > 3 * 128 and w > 6 * 128  # 3 rows of 6 upscaled toy images, prompt and method labels
    assert side_by_side_png({"tlcm-renoise@2": samples["tlcm-renoise@2"]}) is None


# ------------------------------------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("report") / "store")
    cfg = load_config("toy-fast", [f"store.url={store}", *OVERRIDES])
    results = run_pipeline(cfg, reporter=SilentReporter())
    return cfg, results


def _table_rows(md: str, header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = lines.index(header)
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_report_has_the_headline_table_grid_losses_and_stage_times(toy_run):
    cfg, results = toy_run
    store = open_store(cfg)
    ev = next(r for r in results if r.stage == "evaluate")
    metrics = store.open_uri(ev.uri).read_json("metrics.json")
    report = build_report(cfg)
    # the headline table: the teacher at 25 steps first, then the student at 1, 2, 4, values from metrics.json
    table = _table_rows(report.markdown, "| method | steps | prompt_accuracy | accuracy_ci95 | frechet | "
                                         "seconds_per_image |")
    assert [(r[0], int(r[1])) for r in table] == [("teacher-ddim-cfg", 25), ("tlcm-renoise", 1),
                                                  ("tlcm-renoise", 2), ("tlcm-renoise", 4)]
    by_key = {(m["method"], m["steps"]): m for m in metrics}
    for r in table:
        m = by_key[(r[0], int(r[1]))]
        assert float(r[2]) == pytest.approx(m["prompt_accuracy"], rel=1e-3)
        assert float(r[4]) == pytest.approx(m["frechet"], rel=1e-3)
    # the images, each named in the Markdown
    assert set(report.images) == {"metrics.png", "side-by-side.png", "loss-mlcd.png"}
    for name, png in report.images.items():
        assert f"]({name})" in report.markdown and png.startswith(PNG_SIGNATURE)
    assert report.images["side-by-side.png"] == store.open_uri(ev.uri).read_bytes("grids/side-by-side.png")
    assert png_size(report.images["side-by-side.png"])[1] > 3 * 128  # teacher@25, student@2, student@4
    # each stage: status, compute time from its manifest, artifact URI
    stages = _table_rows(report.markdown, "| stage | status | compute time | finished (UTC) | artifact |")
    assert [r[0] for r in stages] == ["teacher-trajectories", "mlcd", "teacher-evaluate", "evaluate"]
    for row, res in zip(stages, results):
        assert row[1] == "complete" and row[2] == f"{res.summary['wall_seconds']:.1f} s" and res.uri in row[4]
    flow_view = build_report(cfg, results=[{"stage": "teacher-trajectories", "cached": True},
                                           {"stage": "mlcd", "cached": False},
                                           {"stage": "teacher-evaluate", "cached": True},
                                           {"stage": "evaluate", "cached": False}])
    statuses = [r[1] for r in _table_rows(flow_view.markdown, "| stage | status | compute time | finished (UTC) | "
                                                              "artifact |")]
    assert statuses == ["cache hit", "computed", "cache hit", "computed"]
    # saved beside the artifacts, images referenced relatively; inlined as data URIs for the Prefect UI
    uri = report.save(store)
    folder = Path(uri).parent
    assert uri == f"{store.url}/report/{ev.fingerprint}/report.md" and Path(uri).read_text() == report.markdown
    assert all((folder / n).read_bytes() == png for n, png in report.images.items())
    inline = report.inline_markdown()
    assert "](metrics.png)" not in inline and inline.count("](data:image/png;base64,") == 3


def test_report_of_a_missing_stage_is_one_clear_user_error(toy_run, tmp_path):
    cfg, _ = toy_run
    copy = tmp_path / "store"
    shutil.copytree(cfg.store.url, copy)
    cfg2 = load_config("toy-fast", [f"store.url={copy}", *OVERRIDES])
    shutil.rmtree(next((copy / "mlcd").iterdir()))
    with pytest.raises(NoFinishedRun, match=r"no finished run of config 'toy-fast' .*stage 'mlcd' has no complete "
                                            r"artifact") as e:
        build_report(cfg2)
    assert "\n" not in str(e.value)
    with pytest.raises(NoFinishedRun, match="does not evaluate"):
        build_report(load_config("toy-fast", [f"store.url={copy}", "stages=[teacher-trajectories,mlcd]", *OVERRIDES]))


def test_cli_report_writes_the_report_and_refuses_a_store_without_the_run(toy_run, tmp_path, capsys):
    from flows.cli import main

    cfg, _ = toy_run
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    out = tmp_path / "out" / "report.md"
    assert main(["report", "--config", "toy-fast", "--store", cfg.store.url, *sets, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# TLCM run report: toy-fast") and "| teacher-ddim-cfg | 25 |" in text
    for name in ("metrics.png", "side-by-side.png", "loss-mlcd.png"):
        assert f"]({name})" in text and (out.parent / name).read_bytes().startswith(PNG_SIGNATURE)
    capsys.readouterr()
    assert main(["report", "--config", "toy-fast", "--store", cfg.store.url, *sets]) == 0
    assert capsys.readouterr().out.startswith("# TLCM run report: toy-fast")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--config", "toy-fast", "--store", str(empty), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no finished run of config 'toy-fast'") and "\n" not in err
    assert main(["report", "--config", "toy-fast", "--store", str(tmp_path / "typo"), *sets]) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_cli_report_from_the_store_alone(toy_run, tmp_path, capsys):
    """`tlcm report --store URL` with no config: the newest evaluated run, its stages found through the inputs each
    manifest records; the same tables as the report built from the config."""
    from flows.cli import main
    from tlcm_core.report import build_report

    cfg, _ = toy_run
    assert main(["report", "--store", cfg.store.url]) == 0
    text = capsys.readouterr().out
    by_config = build_report(cfg).markdown
    assert text.startswith("# TLCM run report: run ")
    for section in ("## Teacher vs student", "## Stages"):  # same headline table and the same stage artifacts
        assert text.split(section)[1].split("##")[0].strip() == by_config.split(section)[1].split("##")[0].strip()
    assert main(["report", "--store", cfg.store.url, "--evaluate", "ffffffff"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: store ") and "ffffffff" in err and "\n" not in err.strip()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--store", str(empty)]) == 2
    assert "no finished (evaluated) run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Prefect UI


def _pngs(markdown: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)]


@pytest.mark.integration
def test_a_flow_run_shows_loss_curves_and_the_run_report_in_a_real_prefect_server(toy_run, tmp_path):
    cfg, _ = toy_run
    store = tmp_path / "store"
    shutil.copytree(cfg.store.url, store)  # trajectories are a cache hit; MLCD and evaluate are forced
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    state = tmp_path / "stack"
    cli = [sys.executable, "-m", "flows.cli"]
    up = subprocess.run([*cli, "stack", "up", "--state-dir", str(state), "--port", "0", "--workers", "0", "--no-ui"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, f"tlcm stack up failed:\n{up.stdout}\n{up.stderr}"
        api = json.loads((state / "stack.json").read_text())["api_url"]
        sets = [a for o in OVERRIDES for a in ("--set", o)]
        run = subprocess.run([*cli, "distill", "--config", "toy-fast", "--store", str(store), *sets, "--force", "mlcd"],
                             env=dict(env, PREFECT_API_URL=api), cwd=REPO, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, f"tlcm distill failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with SyncPrefectClient(api) as c:
            (flow_run,) = c.read_flow_runs()
            only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
            arts = {a.key: a for a in c.read_artifacts(artifact_filter=only_this_run, limit=200) if a.key}
    finally:
        subprocess.run([*cli, "stack", "down", "--state-dir", str(state)], env=env, cwd=REPO, capture_output=True,
                       timeout=120)
    # the loss curve, as an image in the UI, and the same PNG in the MLCD artifact
    (curve,) = _pngs(arts["mlcd-loss-curve"].data)
    (mlcd_dir,) = (store / "mlcd").iterdir()
    assert arts["mlcd-loss-curve"].type == "markdown" and curve == (mlcd_dir / "loss.png").read_bytes()
    assert _pngs(arts["metrics-plot"].data) and _pngs(arts["side-by-side"].data)
    # the run report: headline table, the side-by-side grid, loss curves, each stage's status
    report = arts["tlcm-report"]
    assert report.type == "markdown" and report.data.startswith("# TLCM run report: toy-fast")
    assert "| teacher-ddim-cfg | 25 |" in report.data and "![teacher vs student, same prompts and seeds](data:" \
        in report.data
    (ev_dir,) = (store / "evaluate").iterdir()
    pngs = _pngs(report.data)
    assert (ev_dir / "grids" / "side-by-side.png").read_bytes() in pngs and curve in pngs and len(pngs) == 3
    assert re.search(r"\| teacher-trajectories \| cache hit \| [0-9.]+ s \|", report.data)
    assert re.search(r"\| mlcd \| computed \| [0-9.]+ s \|", report.data)
    saved = store / "report" / ev_dir.name / "report.md"
    assert str(saved) in report.description and saved.read_text().startswith("# TLCM run report")
