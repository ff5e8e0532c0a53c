"""Bad inputs fail with a clear error that names the culprit, before any expensive work (tests/README.md).

"Before expensive work" is checked, not assumed: the teacher loaders (and the evaluator) are replaced by functions
that fail the test if they are reached, and the store is checked to hold nothing new afterwards.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import S3_SECRET
from test_faults import MLCD, fault_config, ref_artifact, reference, tiny_teacher_dir
from tlcm_core.pipeline import PlanError

from tlcm_core.config import ConfigError, load_config
from tlcm_core.lora import LoRAError, check_lora, load_lora_into
from tlcm_core.models import TeacherError
from tlcm_core.pipeline import run_pipeline
from tlcm_core.progress import SilentReporter
from tlcm_core.prompts import PromptsError
from tlcm_core.store import StoreError


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Loading a teacher, a UNet or evaluating fails the test: errors must come before any of these."""
    import diffusers

    import tlcm_core.consistency as consistency
    import tlcm_core.models as models
    import tlcm_core.stages.evaluate as evaluate
    import tlcm_core.stages.teacher_evaluate as teacher_evaluate

    def expensive(*a, **k):
        raise AssertionError("expensive work started before the bad input was reported")

    for mod, name in [(models, "load_pipeline"), (models, "load_unet"), (consistency, "load_unet"),
                      (evaluate, "evaluate_rows"), (teacher_evaluate, "teacher_rows"),
                      (diffusers.DiffusionPipeline, "from_pretrained")]:
        monkeypatch.setattr(mod, name, expensive)


@pytest.fixture
def built_reference():
    """The uninterrupted reference run (its LoRA is the LoRA these tests tamper with), built before the
    expensive-work guard goes up."""
    return reference()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "_lease" not in p.name} \
        if root.exists() else set()


# ----------------------------------------------------------------------------------------------------------------
# Config files and values


def test_malformed_yaml_unknown_keys_and_non_utf8_are_named(tmp_path):
    cases = {
        "malformed.yaml": (b"mlcd:\n  lr: [1e-4\n", "malformed YAML"),
        "list.yaml": (b"- mlcd\n- lcd\n", "must be a mapping"),
        "latin1.yaml": ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8"),
        "unknown-section.yaml": (b"mlcdd:\n  lr: 1.0e-4\n", "mlcdd: unknown key"),
        "unknown-field.yaml": (b"mlcd:\n  lrr: 1.0e-4\n", "mlcd.lrr: unknown key"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError) as err:
            load_config(str(path))
        assert expected in str(err.value) and name in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("override, field", [
    ("mlcd.lr=-1", "mlcd.lr"), ("mlcd.lr=5", "mlcd.lr"), ("mlcd.iterations=abc", "mlcd.iterations"),
    ("lora.rank=0", "lora.rank"), ("schedule.skip=500", "schedule.skip"), ("schedule.segments=0", "schedule.segments"),
    ("trajectories.num_samples=0", "trajectories.num_samples"), ("evaluate.steps=[0]", "evaluate.steps"),
    ("compute.device=tpu", "compute.device"), ("stages=[teacher-trajectories,distill]", "stages"),
    ("store.storage_options={secret: abc}", "store.storage_options"),
])
def test_out_of_range_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("toy-fast", [override])
    assert field in str(err.value)


def test_the_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys, no_expensive_work):
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("base: toy-fast\nmlcd:\n  iterations: -3\n")
    assert main(["distill", "--config", str(bad), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "mlcd.iterations" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------------------------------------------
# Prompt files


@pytest.mark.parametrize("content, expected", [
    (b"", "holds no prompts"),
    (b"# only a comment\n\n   \n", "holds no prompts"),
    ("a red circle\na gr\u00fcn square\n".encode("latin-1"), "not UTF-8"),
    (None, "not found"),
])
def test_empty_missing_or_non_utf8_prompt_files_fail_before_any_work(tmp_path, content, expected, no_expensive_work):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_bytes(content)
    cfg = fault_config(str(tmp_path / "store"), f"trajectories.prompts={prompts}")
    with pytest.raises(PromptsError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    assert str(prompts) in str(err.value) and expected in str(err.value)
    assert _files(tmp_path / "store") == set()


def test_a_prompt_longer_than_the_tokenizer_allows_fails_before_the_teacher_loads(tmp_path, no_expensive_work):
    prompts = tmp_path / "prompts.txt"
    long = " ".join(["a red circle and a blue square"] * 20)
    prompts.write_text(f"a red circle\n{long}\na green cross\n")
    cfg = fault_config(str(tmp_path / "store"), f"trajectories.prompts={prompts}")
    with pytest.raises(PromptsError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    msg = str(err.value)
    assert str(prompts) in msg and "prompt 2 (" in msg and "> 77" in msg and "prompt 1 " not in msg
    assert _files(tmp_path / "store") == set()


# ----------------------------------------------------------------------------------------------------------------
# Stores the worker may not write to


def _run_as_nobody(cfg, fd: int) -> None:
    os.setgid(65534)
    os.setuid(65534)  # the worker runs as an unprivileged user
    try:
        run_pipeline(cfg, reporter=SilentReporter())
        out = {"error": None}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"error": type(e).__name__, "message": str(e)}
    os.write(fd, json.dumps(out).encode())
    os.close(fd)


def test_a_local_store_the_worker_cannot_write_fails_before_any_stage(tmp_path, no_expensive_work):
    """A shared volume owned by another user, read-only for the worker (root here, so the worker drops to nobody)."""
    volume = Path(tempfile.mkdtemp(prefix="tlcm-shared-volume-"))  # outside pytest's root-only tmp folders
    try:
        store = volume / "artifacts"
        store.mkdir()
        os.chmod(volume, 0o755)
        os.chmod(store, 0o555)
        cfg = fault_config(str(store))
        r, w = os.pipe()
        p = multiprocessing.get_context("fork").Process(target=_run_as_nobody, args=(cfg, w))
        p.start()
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                out = json.loads(f.read() or b"{}")
            p.join(60)
        finally:
            if p.is_alive():
                p.kill()
                p.join(10)
        assert p.exitcode == 0
        assert out["error"] == "StoreError", out
        assert "no write permission" in out["message"] and str(store) in out["message"]
        assert _files(store) == set()
    finally:
        shutil.rmtree(volume, ignore_errors=True)


def test_a_local_store_path_under_a_regular_file_is_refused(tmp_path, no_expensive_work):
    (tmp_path / "not-a-folder").write_text("x")
    cfg = fault_config(str(tmp_path / "not-a-folder" / "artifacts"))
    with pytest.raises(StoreError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    assert "not-a-folder" in str(err.value) and "writable path" in str(err.value)


def test_an_s3_bucket_the_worker_may_not_write_fails_before_any_stage(s3_endpoint, no_expensive_work):
    """A shared bucket whose policy makes it read-only (real S3 semantics, enforced by the moto server)."""
    import fsspec

    if not s3_endpoint.running:
        s3_endpoint.start()
    bucket = s3_endpoint.make_bucket()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_endpoint.storage_options)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*",
                                                      "Action": ["s3:PutObject", "s3:DeleteObject"],
                                                      "Resource": f"arn:aws:s3:::{bucket}/*"}]}
    fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(policy))
    cfg = fault_config(f"s3://{bucket}/artifacts")
    with pytest.raises(StoreError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    msg = str(err.value)
    assert f"s3://{bucket}/artifacts" in msg and "no permission to write" in msg and S3_SECRET not in msg
    assert fs.find(bucket) == []

    cfg = fault_config("s3://no-such-bucket-for-tlcm/artifacts")
    with pytest.raises(StoreError, match="does not exist"):
        run_pipeline(cfg, reporter=SilentReporter())


# ----------------------------------------------------------------------------------------------------------------
# LoRAs that do not fit


def _lora_file(tmp_path: Path, tensors=None, metadata=None) -> Path:
    from safetensors.torch import save_file

    ref = ref_artifact(MLCD)
    tensors = ref.load_tensors("lora.safetensors") if tensors is None else tensors
    metadata = ref.tensors_metadata("lora.safetensors") if metadata is None else metadata
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_lora_of_the_wrong_rank_or_base_model_is_refused_by_tlcm_eval(tmp_path, capsys, built_reference,
                                                                        no_expensive_work):
    from flows.cli import main

    lora = _lora_file(tmp_path)
    config = tmp_path / "eval.yaml"
    other_teacher = tmp_path / "another-base"
    shutil.copytree(tiny_teacher_dir(), other_teacher)
    for extra, expected in [(["--set", "lora.rank=8"], "rank 4 does not match lora.rank=8"),
                            (["--set", f"teacher.source={other_teacher}"], "not on the configured teacher")]:
        config.write_text(f"base: toy-fast\nteacher:\n  source: {tiny_teacher_dir()}\nlora:\n  rank: 4\n")
        assert main(["eval", "--config", str(config), "--lora", str(lora), *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(lora) in err and "Traceback" not in err


def test_a_lora_with_forged_metadata_or_foreign_keys_is_refused(tmp_path):
    import torch

    from tlcm_core.toy.pipeline import build_toy_pipeline

    reference()
    ref = ref_artifact(MLCD)
    tensors, meta = ref.load_tensors("lora.safetensors"), ref.tensors_metadata("lora.safetensors")
    cfg = fault_config(str(tmp_path / "store"))
    with pytest.raises(LoRAError, match="not a TLCM LoRA"):
        check_lora(tensors, {}, cfg.lora, where="x.safetensors")
    forged = dict(meta, lora_config=json.dumps({**json.loads(meta["lora_config"]), "rank": 8}))
    with pytest.raises(LoRAError, match=r"rank\(s\) \[4\] but the metadata says 8"):
        check_lora(tensors, forged, where="x.safetensors")
    # a LoRA for another UNet layout: keys that this UNet does not have, or too few of its own
    unet = build_toy_pipeline(seed=3).unet
    renamed = {k.replace("down_blocks", "middle_blocks"): v for k, v in tensors.items()}
    with pytest.raises(LoRAError, match="keys this UNet lacks"):
        load_lora_into(unet, renamed, cfg.lora)
    partial = dict(list(tensors.items())[: len(tensors) // 2])
    with pytest.raises(LoRAError, match="wrong base model or target modules"):
        load_lora_into(build_toy_pipeline(seed=3).unet, partial, cfg.lora)
    assert torch.equal(tensors[next(iter(tensors))], ref.load_tensors("lora.safetensors")[next(iter(tensors))])


# ----------------------------------------------------------------------------------------------------------------
# Teachers that are not SD/SDXL-shaped


def _teacher_copy(tmp_path: Path, edit) -> Path:
    """The tiny teacher's folder without its weights (the checks must not need them), then edited."""
    dst = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir(), dst, ignore=shutil.ignore_patterns("*.safetensors"))
    edit(dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


TEACHERS = {
    "no-model-index": (lambda d: (d / "model_index.json").unlink(), "no model_index.json"),
    "another-pipeline-class": (lambda d: _edit_json(d / "model_index.json", _class_name="PixArtAlphaPipeline"),
                               "is a PixArtAlphaPipeline; supported: StableDiffusionXLPipeline (unet)"),
    "sdxl-files-claiming-to-be-flux": (lambda d: _edit_json(d / "model_index.json", _class_name="FluxPipeline"),
                                       "the pipeline has no transformer"),
    "sdxl-files-claiming-to-be-sd3": (
        lambda d: _edit_json(d / "model_index.json", _class_name="StableDiffusion3Pipeline"),
        "the pipeline has no transformer"),
    "unet-without-text-time": (lambda d: _edit_json(d / "unet" / "config.json", addition_embed_type=None),
                               "not SDXL-shaped"),
    "no-second-text-encoder": (lambda d: _edit_json(d / "model_index.json", text_encoder_2=[None, None]),
                               "no second text encoder"),
    "text-encoders-do-not-fit-the-unet": (
        lambda d: _edit_json(d / "text_encoder_2" / "config.json", hidden_size=48), "cross_attention_dim"),
    "latent-channels-mismatch": (lambda d: _edit_json(d / "vae" / "config.json", latent_channels=16),
                                 "channels"),
}


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_a_teacher_that_is_not_sdxl_shaped_fails_before_it_loads(tmp_path, kind, no_expensive_work):
    edit, expected = TEACHERS[kind]
    teacher = _teacher_copy(tmp_path, edit)
    cfg = fault_config(str(tmp_path / "store"), f"teacher.source={teacher}")
    with pytest.raises(TeacherError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    assert str(teacher) in str(err.value) and expected in str(err.value)
    assert _files(tmp_path / "store") == set()



def test_later_stage_needs_are_checked_before_the_first_stage(tmp_path):
    """A reward model that needs a pickle opt-in, or a missing captions file, fails before trajectories start."""
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import run_pipeline
    from tlcm_core.rewards import RewardError

    stages = "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,finetune,evaluate]"
    cfg = load_config("toy-fast", [f"store.url={tmp_path}", stages, "finetune.reward_weight=1",
                                   "finetune.reward_scorer=mps", f"finetune.reward_model={tmp_path / 'mps.pth'}"])
    with pytest.raises(RewardError, match="allow_pickle"):
        run_pipeline(cfg)
    cfg = load_config("toy-fast", [f"store.url={tmp_path}", stages,
                                   "evaluate.metrics.kind=real", f"evaluate.metrics.captions={tmp_path / 'captions.txt'}"])
    with pytest.raises(PlanError, match="captions"):
        run_pipeline(cfg)
    assert not any(tmp_path.rglob("manifest.json")) and not any(tmp_path.rglob("x_hi"))  # nothing started
