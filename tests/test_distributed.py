"""Multi-process (data-parallel) MLCD through accelerate: 2 processes over gloo on this CPU prove the code path."""

import json

import torch
from conftest import RecordingReporter

from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter


def _overrides(teacher, tmp_path) -> list[str]:
    return [f"teacher.source={teacher}", f"store.url={tmp_path / 'store'}", "trajectories.num_samples=32",
            "trajectories.shard_size=16", "mlcd.iterations=4", "mlcd.batch_size=4", "mlcd.checkpoint_every=2",
            "mlcd.log_every=2", "lora.rank=4", "compute.num_processes=2", "compute.device=cpu"]


def test_mlcd_two_processes(tmp_path):
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    cfg = load_config("toy-fast", _overrides(teacher, tmp_path))
    traj, mlcd = run_pipeline(cfg, stages=["teacher-trajectories", "mlcd"], reporter=SilentReporter())
    assert mlcd.summary["num_processes"] == 2 and not mlcd.cached
    art = open_store(cfg).artifact("mlcd", mlcd.fingerprint)
    m = art.manifest(verify="checksum")
    assert "lora.safetensors" in m.files and not any(f.startswith(("_markers", "checkpoints")) for f in m.files)
    lora = art.load_tensors("lora.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # it learned (B starts at zero)
    log = [json.loads(x) for x in art.read_bytes("train_log.jsonl").decode().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # data parallelism is gradient accumulation over the ranks: rank r takes micro-batches r, r + 2, ... and the
    # gradients are averaged, so one process accumulating 2 micro-batches per step makes the same LoRA
    one = load_config("toy-fast", [o.replace("compute.num_processes=2", "mlcd.grad_accum=2") for o in _overrides(
        teacher, tmp_path)])
    (single,) = run_pipeline(one, stages=["mlcd"], reporter=SilentReporter())
    same = open_store(one).artifact("mlcd", single.fingerprint).load_tensors("lora.safetensors")
    assert same.keys() == lora.keys()
    for k in lora:
        torch.testing.assert_close(same[k], lora[k], rtol=1e-4, atol=1e-6)


def test_finetune_two_processes(tmp_path):
    """Finetune is a training stage like the others: with compute.num_processes=2 it runs data-parallel, the
    student's, the fake score model's and the discriminator's gradients averaged across the processes."""
    from tlcm_core.lora import read_lora
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    common = [f"teacher.source={teacher}", f"store.url={tmp_path / 'store'}", "trajectories.num_samples=32",
              "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=4", "lora.rank=4",
              "compute.device=cpu", "stages=[teacher-trajectories,mlcd,finetune]", "finetune.iterations=2",
              "finetune.batch_size=2", "finetune.q=1", "finetune.log_every=1", "finetune.reward_weight=1",
              "finetune.dmd_weight=1", "finetune.gan_weight=0.1"]
    cfg = load_config("toy-fast", common + ["compute.num_processes=2"])
    _, mlcd, ft = run_pipeline(cfg, reporter=SilentReporter())
    assert ft.stage == "finetune" and ft.summary["num_processes"] == 2 and not ft.cached
    store = open_store(cfg)
    log = [json.loads(x) for x in store.open_uri(ft.uri).read_bytes("train_log.jsonl").decode().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r[k])) for r in log for k in ("reward", "dmd", "gan_g", "fake", "gan_d"))
    before, after = read_lora(store.open_uri(mlcd.uri)).state, read_lora(store.open_uri(ft.uri)).state
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_grad_sync_buckets_every_gradient_and_puts_each_back_in_place(tmp_path, monkeypatch):
    """GradSync all-reduces flattened buckets (one call per bucket, not per parameter): with buckets smaller than
    the parameters, mixed dtypes and a parameter without a gradient, every gradient comes back as its own average.
    One gloo process stands in for the world, so each average is the gradient over `world`."""
    import torch.distributed as dist

    from tlcm_core.training import GradSync

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (calls.append(t.numel()), real(t, **kw))[1])
        sync = GradSync()
        sync.world, sync.BUCKET_ELEMENTS = 2, 10
        shapes = [(3, 2), (4,), (2, 2), (5,), (1,)]
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64 if i == 3 else torch.float32))
                  for i, s in enumerate(shapes)]
        params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
        grads = [torch.randn(p.shape, dtype=p.dtype) for p in params[:-1]]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        sync(params)
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g / 2, rtol=0, atol=0)
        assert params[-1].grad is None
        assert sorted(calls) == sorted([10, 5, 5])  # float32: [6 + 4] then [4 + 1]; float64: [5]
    finally:
        dist.destroy_process_group()


def test_cpu_processes_split_every_batch_and_train_the_same_lora(tmp_path):
    """compute.cpu_processes=2 on a CPU: MLCD runs in 2 processes, each with half of every batch, and makes the
    one-process LoRA (the same batches, gradients averaged); the launching process publishes the loss table and
    curves the processes cannot."""
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    common = [o for o in _overrides(teacher, tmp_path) if not o.startswith("compute.num_processes")]
    split = load_config("toy-fast", common + ["compute.cpu_processes=2"])
    run_pipeline(load_config("toy-fast", common), stages=["teacher-trajectories"], reporter=SilentReporter())
    reporter = RecordingReporter()
    (mlcd,) = run_pipeline(split, stages=["mlcd"], reporter=reporter)  # the pairs: a cache hit
    assert mlcd.summary["num_processes"] == 2 and not mlcd.cached
    progress = reporter.progress_of("mlcd")
    assert progress and progress[-1] == (4, 4) and progress == sorted(progress)  # rank 0's, forwarded
    published = reporter.published
    assert [i[:2] for i in published] == [("table", "mlcd-loss"), ("image", "mlcd-loss-curve")]
    assert len(published[0][2]) == 2 and published[1][2][:8] == b"\x89PNG\r\n\x1a\n"
    (single,) = run_pipeline(load_config("toy-fast", common), stages=["mlcd"], reporter=SilentReporter())
    assert single.fingerprint != mlcd.fingerprint and not single.cached  # the split is part of the recipe's record
    one = open_store(split).artifact("mlcd", single.fingerprint).load_tensors("lora.safetensors")
    two = open_store(split).artifact("mlcd", mlcd.fingerprint).load_tensors("lora.safetensors")
    assert one.keys() == two.keys() and any(v.abs().sum() > 0 for k, v in two.items() if "lora_B" in k)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_cpu_processes_divide_each_trainers_batches_and_refuse_a_batch_they_cannot(tmp_path):
    import pytest

    from tlcm_core.config import ConfigError
    from tlcm_core.distributed import split_batches, world_size

    cfg = load_config("toy-hard", ["compute.cpu_processes=2", "compute.device=cpu", "finetune.batch_size=3"])
    assert world_size(cfg.compute) == 2
    assert world_size(cfg.compute, splits_on_cpu=False) == 1  # finetune: its draws are per micro-batch, not split
    child = split_batches(cfg, 2)
    assert (child.compute.num_processes, child.compute.cpu_processes) == (2, 1)
    assert (child.mlcd.batch_size, child.lcd.batch_size, child.lcd.anchor_batch_size) == (16, 16, 4)
    assert child.finetune.batch_size == 3 and child.lcd.lr == cfg.lcd.lr
    assert world_size(load_config("toy", ["compute.device=cpu"]).compute) == 1  # the default: one process
    assert world_size(load_config("toy-hard", ["compute.device=cpu"]).compute) == 2  # the preset splits
    # num_processes names the world itself (one batch each), as on GPUs
    assert world_size(load_config("toy-hard", ["compute.cpu_processes=2", "compute.num_processes=3"]).compute) == 3
    with pytest.raises(ConfigError, match=r"lcd.anchor_batch_size=3 is not a multiple of 2"):
        load_config("toy-hard", ["compute.cpu_processes=2", "lcd.anchor_batch_size=3"])


def test_progress_forwarding_skips_an_earlier_launchs_file_and_a_half_written_one(tmp_path):
    """A resumed launch must not replay the progress an interrupted one left in the artifact, nor stop on a file it
    catches mid-write; it forwards its own rank 0's progress once per change."""
    from tlcm_core.distributed import PROGRESS, _forward_progress, _progress_reporter
    from tlcm_core.store import ArtifactStore

    out = ArtifactStore(str(tmp_path)).artifact("mlcd", "e" * 16)
    _progress_reporter(out, "mlcd", True, "old").progress("mlcd", 300, 600, loss=0.5)
    reporter = RecordingReporter()
    last = _forward_progress(out, "mlcd", reporter, None, "new")
    assert last is None and reporter.events == []
    _progress_reporter(out, "mlcd", False, "new").progress("mlcd", 250, 600)  # rank 1 writes nothing
    assert _forward_progress(out, "mlcd", reporter, last, "new") is None
    _progress_reporter(out, "mlcd", True, "new").progress("mlcd", 200, 600, loss=0.25)
    last = _forward_progress(out, "mlcd", reporter, last, "new")
    last = _forward_progress(out, "mlcd", reporter, last, "new")  # unchanged: not forwarded again
    out.write_bytes(PROGRESS.format(stage="mlcd"), b'{"launch": "new", "key": "ml')  # caught mid-write
    assert _forward_progress(out, "mlcd", reporter, last, "new") == last
    assert reporter.events == [("progress", "mlcd", 200, 600)]
