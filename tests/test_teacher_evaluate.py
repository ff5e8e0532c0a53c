"""Stage `teacher-evaluate`: the teacher's rows of `evaluate` are their own cached artifact.

Comparing LoRAs (another MLCD setting, other student step counts or sampler) reuses the teacher's rows and never
samples the teacher again; a change of the teacher's protocol (evaluate.teacher_steps) recomputes them. The numbers
are those the in-process path (`evaluate_rows`, what `tlcm eval` runs) gets sampling the teacher itself: every row,
the side-by-side grid, and FID against the teacher's samples (fid_reference=teacher).

One tiny toy run (module fixture) on the shipped toy teacher; reruns in its store reuse the trajectories.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_teacher_evaluate.py
"""

from __future__ import annotations

import functools

import pytest
import torch

from test_metrics import TinyFeatures  # noqa: E402 - the fast FID feature stand-in

import tlcm_core.evaluation as evaluation
from tlcm_core.config import load_config
from tlcm_core.evaluation import FID_REFERENCE, TEACHER_SHOWN, evaluate_rows, load_teacher_rows, side_by_side_png
from tlcm_core.lora import read_lora
from tlcm_core.models import load_pipeline, teacher_identity
from tlcm_core.pipeline import open_store, plan, plan_run, run_pipeline
from tlcm_core.progress import SilentReporter

OVERRIDES = ["compute.device=cpu", "trajectories.num_samples=64", "trajectories.shard_size=32", "mlcd.iterations=4",
             "mlcd.log_every=2", "mlcd.checkpoint_every=100", "lora.rank=4", "evaluate.steps=[1,2,4]",
             "evaluate.teacher_steps=[2,25]", "evaluate.num_samples=8", "evaluate.batch_size=4",
             "evaluate.grid_size=6"]
STAGES = ["teacher-trajectories", "mlcd", "teacher-evaluate", "evaluate"]


def config(store, *extra: str):
    return load_config("toy-fast", [f"store.url={store}", *OVERRIDES, *extra])


@pytest.fixture
def teacher_calls(monkeypatch):
    """How often the teacher's baseline sampler runs: once per batch the teacher is sampled."""
    calls = []
    real = evaluation.teacher_sample

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "teacher_sample", spy)
    return calls


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(tmp_path_factory.mktemp("teacher-evaluate") / "store")


@pytest.fixture
def fid_teacher(monkeypatch, tmp_path):
    """Overrides for the field's FID against the teacher's 25-step samples (TinyFeatures for InceptionV3)."""
    import tlcm_core.metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "RealMetrics", functools.partial(metrics_mod.RealMetrics,
                                                                      fid_feature=TinyFeatures()))
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\na green triangle\na red cross\n")
    return ["evaluate.metrics.kind=real", "evaluate.metrics.run=[fid]", f"evaluate.metrics.captions={captions}",
            "evaluate.metrics.fid_reference=teacher", "evaluate.teacher_steps=[2]"]


def _in_process(cfg, results) -> tuple[list[dict], bytes | None]:
    """The rows and side-by-side grid `evaluate_rows` makes sampling the teacher itself (tlcm eval's path)."""
    mlcd = next(r for r in results if r.stage == "mlcd")
    lora = read_lora(open_store(cfg).open_uri(mlcd.uri), cfg.lora, teacher_identity(cfg.teacher)).state
    samples: dict = {}
    rows = evaluate_rows(cfg, lora, cfg.evaluate.steps, SilentReporter(),
                         include_teacher_steps=cfg.evaluate.teacher_steps, samples=samples)
    return rows, side_by_side_png(samples)


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows]


def _check_same_as_in_process(cfg, results) -> list[dict]:
    assert [r.stage for r in results] == STAGES
    store = open_store(cfg)
    ev, te = (store.open_uri(r.uri) for r in results[3:1:-1])
    rows, teacher = ev.read_json("metrics.json"), load_teacher_rows(te)
    assert rows[:len(teacher.rows)] == teacher.rows  # merged as stored, first
    expected_rows, expected_side = _in_process(cfg, results)
    assert _timeless(rows) == _timeless(expected_rows)  # every value but the timing, exactly
    assert ev.read_bytes("grids/side-by-side.png") == expected_side
    for r in teacher.rows:  # the teacher's grids are in both artifacts
        name = f"grids/{r['method']}-{r['steps']}.png"
        assert ev.read_bytes(name) == te.read_bytes(name)
    return rows


def test_the_teacher_rows_are_an_artifact_with_the_numbers_of_in_process_sampling(store):
    cfg = config(store)
    results = run_pipeline(cfg, reporter=SilentReporter())  # teacher-evaluate is implied by evaluate
    assert not any(r.cached for r in results)
    rows = _check_same_as_in_process(cfg, results)
    assert [(r["method"], r["steps"]) for r in rows] == [("teacher-ddim-cfg", 2), ("teacher-ddim-cfg", 25),
                                                         ("tlcm-renoise", 1), ("tlcm-renoise", 2), ("tlcm-renoise", 4)]
    te = open_store(cfg).open_uri(results[2].uri)
    files = set(te.manifest().files)
    assert {"metrics.json", "metrics.md", "grids/teacher-ddim-cfg-2.png", "grids/teacher-ddim-cfg-25.png",
            TEACHER_SHOWN} <= files and FID_REFERENCE not in files
    assert te.tensors_metadata(TEACHER_SHOWN)["row"] == "teacher-ddim-cfg@25"  # all the side-by-side shows of it


def test_comparing_loras_reuses_the_teacher_rows(store, teacher_calls):
    base = config(store)
    run_pipeline(base, reporter=SilentReporter())  # the first test's artifacts (or made here when run alone)
    teacher_calls.clear()
    first = plan(base)
    for student in (["mlcd.lr=2e-4"], ["evaluate.steps=[1,2]", "evaluate.sampler=multistep"]):
        results = run_pipeline(config(store, *student), reporter=SilentReporter())
        cached = {r.stage: r.cached for r in results}
        assert cached["teacher-evaluate"] and not cached["evaluate"], (student, cached)
        assert cached["mlcd"] == (student != ["mlcd.lr=2e-4"])
        assert results[2].fingerprint == first["teacher-evaluate"].fingerprint
        assert teacher_calls == [], f"{student}: the teacher was sampled again"
        rows = results[3].summary["rows"]
        assert [r for r in rows if r["method"] == "teacher-ddim-cfg"] == results[2].summary["rows"]
    # the teacher's protocol changed: its rows are recomputed (and the student's, whose table they join)
    results = run_pipeline(config(store, "evaluate.teacher_steps=[3]"), reporter=SilentReporter())
    assert [r.cached for r in results] == [True, True, False, False]
    assert len(teacher_calls) == 2  # 8 samples in batches of 4, at 3 steps
    assert [(r["method"], r["steps"]) for r in results[3].summary["rows"]][0] == ("teacher-ddim-cfg", 3)


def test_fid_against_the_teacher_uses_its_stored_statistics(store, teacher_calls, fid_teacher):
    cfg = config(store, *fid_teacher)
    results = run_pipeline(cfg, reporter=SilentReporter())
    assert [r.cached for r in results] == [True, True, False, False]
    te = open_store(cfg).open_uri(results[2].uri)
    assert FID_REFERENCE in te.manifest().files  # statistics, not images
    assert [(r["method"], r["steps"]) for r in te.read_json("metrics.json")] == [("teacher-ddim-cfg", 25),
                                                                               ("teacher-ddim-cfg", 2)]
    teacher_calls.clear()
    rows = _check_same_as_in_process(cfg, results)  # the in-process path samples the reference itself
    assert teacher_calls, "the in-process reference run did sample the teacher"
    assert all("fid_teacher" in r for r in rows) and min(r["fid_teacher"] for r in rows[2:]) > 1e-3
    teacher_calls.clear()
    again = run_pipeline(config(store, *fid_teacher, "evaluate.steps=[2]"), reporter=SilentReporter())
    assert [r.cached for r in again] == [True, True, True, False] and teacher_calls == []
    assert again[3].summary["rows"][-1] == {**rows[-2], "seconds_per_image": again[3].summary["rows"][-1][
        "seconds_per_image"]}  # the student at 2 steps measured against the stored reference: the same FID


def test_the_teacher_alone_is_sampled_by_teacher_evaluate_only(tmp_path, teacher_calls, monkeypatch):
    """No LoRA stage: the teacher's rows are at evaluate.steps (as in tlcm eval without --lora); evaluate copies
    them and loads nothing."""
    cfg = load_config("toy-fast", [f"store.url={tmp_path}", "stages=[evaluate]", "compute.device=cpu",
                                   "evaluate.steps=[1,2]", "evaluate.num_samples=4", "evaluate.batch_size=4",
                                   "evaluate.grid_size=4"])
    te, ev = plan(cfg)["teacher-evaluate"], plan(cfg)["evaluate"]
    assert "evaluate.steps" in te.config and "evaluate.teacher_steps" not in te.config
    assert ev.inputs == {"teacher": "teacher-evaluate"}
    results = run_pipeline(cfg, reporter=SilentReporter(), stages=["teacher-evaluate"])
    assert len(teacher_calls) == 2
    monkeypatch.setattr(evaluation, "load_pipeline", lambda *a, **k: pytest.fail("evaluate loaded the teacher"))
    (res,) = run_pipeline(cfg, reporter=SilentReporter(), stages=["evaluate"])
    assert res.summary["rows"] == results[0].summary["rows"] and len(teacher_calls) == 2


def test_which_settings_the_teacher_rows_depend_on(tmp_path):
    base = plan(config(tmp_path))
    for change, changed in ((["evaluate.steps=[1,2]"], ["evaluate"]), (["evaluate.sampler=multistep"], ["evaluate"]),
                            (["mlcd.lr=2e-4"], ["mlcd", "evaluate"]),
                            (["schedule.segments=4"], ["teacher-trajectories", "mlcd", "evaluate"]),
                            (["evaluate.teacher_steps=[25]"], ["teacher-evaluate", "evaluate"]),
                            (["evaluate.seed=7"], ["teacher-evaluate", "evaluate"]),
                            (["schedule.guidance=5"], STAGES),
                            (["evaluate.metrics.kind=none"], ["teacher-evaluate", "evaluate"]),
                            (["evaluate.teacher_guidance=5"], ["teacher-evaluate", "evaluate"])):
        p = plan(config(tmp_path, *change))
        assert [s for s in STAGES if p[s].fingerprint != base[s].fingerprint] == changed, change
    # evaluate.teacher_guidance set: the distillation's scale no longer shapes the teacher's rows
    apart = plan(config(tmp_path, "evaluate.teacher_guidance=7"))
    other = plan(config(tmp_path, "evaluate.teacher_guidance=7", "schedule.guidance=3"))
    assert apart["teacher-evaluate"].fingerprint == other["teacher-evaluate"].fingerprint
    assert apart["mlcd"].fingerprint != other["mlcd"].fingerprint
    # the whole pipeline runs the implied teacher-evaluate; --stages runs what it names
    assert plan_run(config(tmp_path), access="none").todo == STAGES
    assert plan_run(config(tmp_path), ["evaluate"], access="none").todo == ["evaluate"]
    # no teacher rows asked for: evaluate takes no teacher input, and teacher-evaluate is not planned
    none = config(tmp_path, "evaluate.teacher_steps=[]")
    assert "teacher" not in plan(none)["evaluate"].inputs and "teacher-evaluate" not in plan(none).stages
    assert plan_run(none, access="none").todo == ["teacher-trajectories", "mlcd", "evaluate"]


def test_the_teacher_rows_use_evaluate_teacher_guidance(monkeypatch):
    """The teacher's baseline sampler gets evaluate.teacher_guidance when it is set, else schedule.guidance."""
    scales = []
    monkeypatch.setattr(evaluation, "teacher_sample", lambda model, x_T, steps, cond, unc, w, grid: scales.append(w)
                        or x_T)
    for extra, want in (([], 7.0), (["evaluate.teacher_guidance=2.5"], 2.5)):
        cfg = load_config("toy-fast", ["compute.device=cpu", "schedule.guidance=7", *extra])
        sampler = evaluation.Sampler(cfg, load_pipeline(cfg.teacher, torch.device("cpu")), None)
        x_T = torch.randn(2, *sampler.shape)
        cond = sampler.cond[torch.tensor([0, 1])]
        sampler.latents(2, x_T, cond, torch.Generator().manual_seed(0))
        assert scales[-1] == want, extra
