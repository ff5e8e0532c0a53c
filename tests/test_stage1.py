"""Stage 1 end to end on a tiny random-weight SDXL-shaped teacher loaded from a local folder (the SDXL loader's
code path): trajectories -> MLCD -> evaluate, caching, fingerprints, MDS content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RecordingReporter

from tlcm_core.config import load_config
from tlcm_core.models import Denoiser, encode_prompts, load_pipeline
from tlcm_core.pipeline import open_store, plan, run_pipeline
from tlcm_core.progress import SilentReporter
from tlcm_core.schedule import NoiseSchedule, ddim, mds_plan, milestones
from tlcm_core.stages.teacher_trajectories import plan_samples


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    from tlcm_core.toy.pipeline import build_toy_pipeline

    path = tmp_path_factory.mktemp("teacher") / "tiny-sdxl"
    build_toy_pipeline(seed=3).save_pretrained(path)
    return str(path)


def tiny_config(teacher: str, store: str, *extra: str):
    return load_config("toy-fast", [
        f"teacher.source={teacher}", f"store.url={store}", "trajectories.num_samples=48",
        "trajectories.shard_size=16", "trajectories.batch_size=16", "mlcd.iterations=6", "mlcd.batch_size=8",
        "mlcd.checkpoint_every=3", "mlcd.log_every=2", "evaluate.num_samples=8", "evaluate.steps=[1,2]",
        "evaluate.teacher_steps=[2]", "evaluate.batch_size=8", "lora.rank=4", *extra])


def test_pipeline_runs_caches_and_reuses(tiny_teacher, tmp_path):
    cfg = tiny_config(tiny_teacher, str(tmp_path / "store"))
    first = run_pipeline(cfg, reporter=SilentReporter())
    # teacher-evaluate (evaluate's teacher rows) runs with evaluate without being listed in `stages`
    assert [r.stage for r in first] == ["teacher-trajectories", "mlcd", "teacher-evaluate", "evaluate"]
    assert not any(r.cached for r in first)
    store = open_store(cfg)
    for r in first:
        m = store.artifact(r.stage, r.fingerprint).manifest(verify="checksum")
        assert m.fingerprint == r.fingerprint and m.files
    assert first[0].summary["num_samples"] == 48
    rows = first[3].summary["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("teacher-ddim-cfg", 2), ("tlcm-renoise", 1),
                                                         ("tlcm-renoise", 2)]
    log = store.artifact("mlcd", first[1].fingerprint).read_bytes("train_log.jsonl").decode().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(__import__("json").loads(ln)["loss"])) for ln in log)

    again = run_pipeline(cfg, reporter=SilentReporter())
    assert all(r.cached for r in again)
    assert [r.uri for r in again] == [r.uri for r in first]

    # a new MLCD setting reuses the trajectories and the teacher's rows, recomputes MLCD and what depends on it
    cfg2 = tiny_config(tiny_teacher, str(tmp_path / "store"), "mlcd.lr=2e-4")
    third = run_pipeline(cfg2, reporter=SilentReporter())
    assert [r.cached for r in third] == [True, False, True, False]
    assert third[1].fingerprint != first[1].fingerprint

    # --force on MLCD recomputes it and evaluate, not the trajectories (nor the teacher's rows)
    forced = run_pipeline(cfg, force=["mlcd"], reporter=SilentReporter())
    assert [r.cached for r in forced] == [True, False, True, False]
    assert forced[1].fingerprint == first[1].fingerprint


def test_fingerprints_follow_the_config(tiny_teacher, tmp_path):
    base = plan(tiny_config(tiny_teacher, str(tmp_path)))
    same = plan(tiny_config(tiny_teacher, str(tmp_path / "elsewhere")))
    assert {k: v.fingerprint for k, v in base.stages.items()} == {k: v.fingerprint for k, v in same.stages.items()}
    batch = plan(tiny_config(tiny_teacher, str(tmp_path), "trajectories.batch_size=4", "mlcd.log_every=1"))
    assert batch["teacher-trajectories"].fingerprint == base["teacher-trajectories"].fingerprint
    assert batch["mlcd"].fingerprint == base["mlcd"].fingerprint
    skip = plan(tiny_config(tiny_teacher, str(tmp_path), "schedule.skip=10"))
    assert [s for s in base.stages if skip[s].fingerprint == base[s].fingerprint] == ["teacher-evaluate"]  # DDIM
    assert base.dependents("mlcd") == ["mlcd", "evaluate"]


def test_ema_decay_reaches_the_lora_and_only_its_own_fingerprint(tiny_teacher, tmp_path):
    store = str(tmp_path / "store")
    plain, avg = tiny_config(tiny_teacher, store), tiny_config(tiny_teacher, store, "mlcd.ema_decay=0.5")
    a, b = plan(plain), plan(avg)
    assert [s for s in a.stages if a[s].fingerprint != b[s].fingerprint] == ["mlcd", "evaluate"]
    loras = []
    for cfg in (plain, avg):
        res = {r.stage: r for r in run_pipeline(cfg, reporter=SilentReporter())}
        loras.append(open_store(cfg).artifact("mlcd", res["mlcd"].fingerprint).load_tensors("lora.safetensors"))
    assert loras[0].keys() == loras[1].keys()
    assert any(not torch.allclose(loras[0][k], loras[1][k]) for k in loras[0])


def test_stored_pairs_are_mds_states_and_one_teacher_jump(tiny_teacher, tmp_path):
    """Recompute a few samples with a plain loop over mds_plan and compare with what the stage stored."""
    cfg = tiny_config(tiny_teacher, str(tmp_path / "store"), "trajectories.num_samples=16")
    (traj,) = run_pipeline(cfg, stages=["teacher-trajectories"], reporter=SilentReporter())
    art = open_store(cfg).artifact("teacher-trajectories", traj.fingerprint)
    pipe = load_pipeline(cfg.teacher, torch.device("cpu"))
    sch = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    teacher = Denoiser(pipe.unet, sch)
    bounds = milestones(1000, cfg.schedule.segments)
    prompts = __import__("tlcm_core.prompts", fromlist=["x"]).load_prompts("toy")
    cond, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution)
    sp = plan_samples(0, 16, base_seed=cfg.compute.seed, num_prompts=len(prompts), shape=(4, 16, 16),
                      bounds=bounds, skip=cfg.schedule.skip)
    x_hi, x_lo = art.open_array("x_hi")[...], art.open_array("x_lo")[...]
    assert np.array_equal(art.open_array("t_hi")[...], sp.t_hi.numpy())
    assert np.array_equal(art.open_array("prompt_idx")[...], sp.prompt_idx)
    for i in (0, 5, 11):
        c = cond[[int(sp.prompt_idx[i])]]
        x = sp.noise[i:i + 1]
        plan_ = mds_plan(int(sp.t_hi[i]), bounds)
        with torch.no_grad():
            for t, s in zip(plan_, plan_[1:]):
                x0, _ = teacher.guided(x, torch.tensor([t]), c, uncond, cfg.schedule.guidance)
                x = ddim(sch, x, x0, t, s)
            torch.testing.assert_close(torch.from_numpy(x_hi[i:i + 1]), x, rtol=1e-4, atol=1e-4)
            x0, _ = teacher.guided(x, sp.t_hi[i:i + 1], c, uncond, cfg.schedule.guidance)
            lo = ddim(sch, x, x0, int(sp.t_hi[i]), int(sp.t_lo[i]))
            torch.testing.assert_close(torch.from_numpy(x_lo[i:i + 1]), lo, rtol=1e-4, atol=1e-4)


def test_cpu_dtype_bfloat16_samples_with_bfloat16_weights(tiny_teacher, tmp_path, monkeypatch):
    """compute.cpu_dtype=bfloat16: the trajectory stage's teacher runs in bfloat16 on the CPU (pairs that differ from
    float32's by bfloat16 rounding, not more), under its own fingerprint; the default's fingerprint is the one from
    before the field existed (tlcm_core/stage.py HASHED_UNLESS_DEFAULT)."""
    import tlcm_core.models as models
    from tlcm_core.stage import config_slice
    from tlcm_core.stages import REGISTRY

    cfg32 = tiny_config(tiny_teacher, str(tmp_path / "store"), "trajectories.num_samples=16")
    cfg16 = tiny_config(tiny_teacher, str(tmp_path / "store"), "trajectories.num_samples=16",
                        "compute.cpu_dtype=bfloat16")
    assert "compute.cpu_dtype" not in config_slice(REGISTRY["teacher-trajectories"], cfg32)
    assert config_slice(REGISTRY["teacher-trajectories"], cfg16)["compute.cpu_dtype"] == "bfloat16"
    seen = []
    real_load = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda teacher, device, dtype=torch.float32:
                        seen.append(dtype) or real_load(teacher, device, dtype))
    (a,) = run_pipeline(cfg32, stages=["teacher-trajectories"], reporter=SilentReporter())
    (b,) = run_pipeline(cfg16, stages=["teacher-trajectories"], reporter=SilentReporter())
    assert seen == [torch.float32, torch.bfloat16] and a.fingerprint != b.fingerprint
    store = open_store(cfg32)
    x32 = store.artifact("teacher-trajectories", a.fingerprint).open_array("x_lo")[...]
    x16 = store.artifact("teacher-trajectories", b.fingerprint).open_array("x_lo")[...]
    assert x16.dtype == np.float32 and np.isfinite(x16).all()
    err = np.abs(x16 - x32).max() / np.abs(x32).max()
    assert 0 < err < 0.05, err  # bfloat16 keeps 8 bits of mantissa: ~0.4% per operation


def test_cpu_dtype_bfloat16_warns_once_where_the_cpu_emulates_it(monkeypatch, caplog):
    import logging

    import tlcm_core.models as models
    from tlcm_core.config import ComputeConfig

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    models._warn_emulated_bf16.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="tlcm"):
        assert models.resolve_dtype(ComputeConfig(), cpu) == torch.float32
        assert not caplog.records  # float32: nothing to say
        for _ in range(2):
            assert models.resolve_dtype(ComputeConfig(cpu_dtype="bfloat16"), cpu) == torch.bfloat16
    assert len(caplog.records) == 1 and "compute.cpu_dtype=float32" in caplog.records[0].getMessage()
    models._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    caplog.clear()
    assert models.resolve_dtype(ComputeConfig(cpu_dtype="bfloat16"), cpu) == torch.bfloat16
    assert not caplog.records
    # on an accelerator compute.dtype decides, as before
    assert models.resolve_dtype(ComputeConfig(dtype="float16", cpu_dtype="bfloat16"), torch.device("cuda")) == \
        torch.float16


def test_cpu_dtype_auto_is_bfloat16_only_where_the_cpu_computes_it_and_hashes_as_what_it_chose(monkeypatch):
    """compute.cpu_dtype=auto: bfloat16 on a CPU with AVX512-BF16 or AMX, float32 elsewhere (without the emulation
    warning) and where /proc/cpuinfo is absent; every stage's fingerprint is that of the explicit dtype it chose, so
    an auto run reuses (and is reused by) the explicit one's artifacts on the same machine."""
    import tlcm_core.models as models

    stages = "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,evaluate]"
    explicit = {d: plan(load_config("toy-fast", [stages, f"compute.cpu_dtype={d}"])) for d in ("float32", "bfloat16")}
    cpu = torch.device("cpu")
    for native, want in ((True, "bfloat16"), (False, "float32"), (None, "float32")):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda native=native: native)
        models._warn_emulated_bf16.cache_clear()
        auto = load_config("toy-fast", [stages, "compute.cpu_dtype=auto"])
        assert models.resolve_dtype(auto.compute, cpu) == getattr(torch, want)
        p = plan(auto)
        assert all(p[s].fingerprint == explicit[want][s].fingerprint for s in p.stages), native
    assert models._warn_emulated_bf16.cache_info().currsize == 0


def test_two_shard_workers_at_once_then_commit(tiny_teacher, tmp_path):
    """Two processes fill disjoint shards of one artifact at the same time (both encode the text conditioning);
    the final run commits; the result equals a single-process run byte for byte."""
    import subprocess
    import sys

    def cfg_for(store):
        return tiny_config(tiny_teacher, str(store), "trajectories.num_samples=32")

    code = ("import sys; from tlcm_core.config import load_config; from tlcm_core.pipeline import run_stage; "
            "from tlcm_core.progress import SilentReporter; import json; "
            "cfg = load_config('toy-fast', json.loads(sys.argv[1])); "
            "run_stage(cfg, 'teacher-trajectories', reporter=SilentReporter(), shards=[int(sys.argv[2])])")
    import json

    args = [f"teacher.source={tiny_teacher}", f"store.url={tmp_path / 'par'}", "trajectories.num_samples=32",
            "trajectories.shard_size=16", "trajectories.batch_size=16", "mlcd.iterations=6", "mlcd.batch_size=8",
            "mlcd.checkpoint_every=3", "mlcd.log_every=2", "evaluate.num_samples=8", "evaluate.steps=[1,2]",
            "evaluate.teacher_steps=[2]", "evaluate.batch_size=8", "lora.rank=4"]
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(args), str(i)]) for i in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    par = cfg_for(tmp_path / "par")
    art = open_store(par).artifact("teacher-trajectories", plan(par)["teacher-trajectories"].fingerprint)
    assert art.done_markers() == {"text", "shard-00000", "shard-00001"} and not art.exists()  # filled, not committed
    (res,) = run_pipeline(par, stages=["teacher-trajectories"], reporter=SilentReporter())
    assert not res.cached and res.summary["num_samples"] == 32
    (ref,) = run_pipeline(cfg_for(tmp_path / "seq"), stages=["teacher-trajectories"], reporter=SilentReporter())
    a = open_store(par).artifact("teacher-trajectories", res.fingerprint).manifest(verify="checksum")
    b = open_store(cfg_for(tmp_path / "seq")).artifact("teacher-trajectories", ref.fingerprint).manifest()
    assert {k: v.sha256 for k, v in a.files.items()} == {k: v.sha256 for k, v in b.files.items()}


def test_compute_num_threads_applies_to_the_stages_of_a_run(tiny_teacher, tmp_path):
    """compute.num_threads sets torch's threads for the stages a run executes in its process (not only `tlcm eval`)."""
    cfg = tiny_config(tiny_teacher, str(tmp_path / "s"), "trajectories.num_samples=16", "compute.num_threads=2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_pipeline(cfg, stages=["teacher-trajectories"], reporter=SilentReporter())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_processes_fill_a_sharded_stage_in_local_processes(tiny_teacher, tmp_path, monkeypatch):
    """compute.cpu_processes=2 on a CPU fills teacher-trajectories' shards in two local processes, forwarding their
    progress. One of them fails here: it leaves its shard to the stage's own run, which fills it and commits, and the
    artifact equals the one-process run's byte for byte (test_stage2.py: both processes succeed)."""
    import sys

    from tlcm_core import shard_processes

    def run(name, *extra):
        cfg = tiny_config(tiny_teacher, str(tmp_path / name), "trajectories.num_samples=32", *extra)
        seen = RecordingReporter()
        (res,) = run_pipeline(cfg, stages=["teacher-trajectories"], reporter=seen)
        m = open_store(cfg).artifact("teacher-trajectories", res.fingerprint).manifest(verify="checksum")
        return {k: v.sha256 for k, v in m.files.items()}, seen

    ref, _ = run("one")
    real = shard_processes.command
    monkeypatch.setattr(shard_processes, "command", lambda *args: (  # args end with the process's shards
        [sys.executable, "-c", "raise SystemExit(3)"] if args[-1] == [1] else real(*args)))
    failed, seen = run("failed", "compute.cpu_processes=2")
    assert failed == ref
    assert any("2 shards in 2 local processes" in m for m in seen.logs)
    assert any("shards 1..1 exited with code 3" in m for m in seen.logs)
    assert (1, 2) in seen.progress_of("teacher-trajectories")  # shard 0, from its process
    assert seen.progress_of("teacher-trajectories")[-1] == (2, 2)  # shard 1, from the stage's own run
