"""bench/checkpoint_lora.py: a training checkpoint's student as a LoRA file, the tool behind RESULTS' rows for a
stage evaluated part-way through a longer run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from checkpoint_lora import checkpoint_lora  # noqa: E402


def test_step_n_of_a_longer_run_is_the_n_step_runs_lora(tmp_path):
    """With a constant learning rate, MLCD's step-6 checkpoint of an 8-step run, written as a LoRA file, equals the
    6-step run's own LoRA tensor for tensor, with its metadata; a step that was not kept is refused by name."""
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    base = [f"teacher.source={teacher}", f"store.url={tmp_path / 'store'}", "stages=[teacher-trajectories,mlcd]",
            "trajectories.num_samples=32", "trajectories.shard_size=16", "mlcd.batch_size=8", "lora.rank=4",
            "mlcd.checkpoint_every=3"]
    short, long = (load_config("toy-fast", [*base, f"mlcd.iterations={n}"]) for n in (6, 8))
    six = run_pipeline(short, reporter=SilentReporter())[1]
    eight = run_pipeline(long, reporter=SilentReporter())[1]
    store = open_store(short)
    want = Path(store.artifact("mlcd", six.fingerprint).path("lora.safetensors"))
    folder = Path(store.artifact("mlcd", eight.fingerprint).path("lora.safetensors")).parent
    out = tmp_path / "step6.safetensors"
    assert checkpoint_lora(folder, 6, out) == len(load_file(str(want)))
    got, ref = load_file(str(out)), load_file(str(want))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not torch.equal(load_file(str(folder / "lora.safetensors"))[next(iter(ref))], ref[next(iter(ref))])
    with safe_open(str(out), "pt") as a, safe_open(str(want), "pt") as b:
        assert a.metadata() == b.metadata()
    with pytest.raises(SystemExit, match="no such checkpoint .kept: step-00000003, step-00000006"):
        checkpoint_lora(folder, 5, tmp_path / "x.safetensors")
