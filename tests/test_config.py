"""Config presets, overrides and the promised error messages; tlcm_core's independence from Prefect."""

import subprocess
import sys

import pytest
import yaml

from tlcm_core.config import (ConfigError, PipelineConfig, dump_config, load_config, preset_names,
                              validate_config)


@pytest.mark.parametrize("name", ["toy", "toy-fast", "sdxl", "sd15", "flux-dev", "sd35"])
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(name)
    assert cfg.name == name
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert again.model_dump() == cfg.model_dump()


def test_preset_names_and_paper_settings():
    assert {"toy", "toy-fast", "sdxl", "sd15"} <= set(preset_names())
    sdxl = load_config("sdxl")
    assert (sdxl.schedule.segments, sdxl.schedule.skip, sdxl.schedule.guidance) == (8, 20, 8.0)
    assert (sdxl.mlcd.iterations, sdxl.mlcd.lr) == (12000, 1e-4)
    assert (sdxl.lcd.iterations, sdxl.lcd.lr, sdxl.lcd_trajectories.q, sdxl.lcd_trajectories.p) == (2000, 1e-5, 4, 3)
    assert (sdxl.finetune.batch_size, sdxl.finetune.discriminator_lr) == (4, 1e-4)
    assert sdxl.lora.rank == 64 and sdxl.lora.target_modules == "auto"  # a UNet teacher's: the official list
    fast = load_config("toy-fast")
    assert fast.trajectories.num_samples < load_config("toy").trajectories.num_samples  # inherits, then shrinks
    assert fast.schedule.guidance == load_config("toy").schedule.guidance


def test_overrides():
    cfg = load_config("toy", ["mlcd.lr=2e-4", "evaluate.steps=[2,4]", "trajectories.mds=false",
                              "compute.device=cpu"])
    assert cfg.mlcd.lr == 2e-4 and cfg.evaluate.steps == [2, 4] and cfg.trajectories.mds is False


@pytest.mark.parametrize("override, words", [
    (["mlcd.lr=-1"], ["mlcd.lr", "-1", "greater than 0"]),
    (["mlcd.lrr=1e-4"], ["mlcd.lrr", "unknown key"]),
    (["schedule.skip=500"], ["schedule.skip=500", "larger than one segment"]),
    (["evaluate.steps=[0,2]"], ["evaluate.steps", "1..64"]),
    (["evaluate.steps=[2,9]"], ["evaluate.steps=[2, 9]", "schedule.segments=8"]),
    (["finetune.sampler_steps=[9]"], ["finetune.sampler_steps=[9]", "1 to schedule.segments=8"]),
    (["finetune.sampler_steps=[]"], ["finetune.sampler_steps=[]", "give at least one"]),
    (["stages=[mlcd,distill]"], ["unknown stage", "distill"]),
    (["compute.device=tpu"], ["compute.device", "tpu", "allowed"]),
    (["mlcd.distance=l1"], ["mlcd.distance", "'l1'", "mse"]),
    (["store.storage_options={secret: x}"], ["credentials do not belong"]),
    (["mlcd.lr"], ["section.field=value"]),
])
def test_bad_values_name_field_value_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("toy", override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mlcd: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(str(bad))
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(bad))
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_base_inheritance_and_validation_before_models(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "toy", "mlcd": {"iterations": 7}}))
    # a base named as a preset resolves too
    (tmp_path / "toy.yaml").write_text((__import__("tlcm_core.config", fromlist=["x"]).PRESETS_DIR
                                        / "toy.yaml").read_text())
    cfg = load_config(str(child))
    assert cfg.mlcd.iterations == 7 and cfg.trajectories.num_samples == load_config("toy").trajectories.num_samples
    assert isinstance(validate_config({}), PipelineConfig)


def test_tlcm_core_never_imports_prefect():
    code = ("import sys, importlib, pkgutil, tlcm_core\n"
            "for m in pkgutil.walk_packages(tlcm_core.__path__, 'tlcm_core.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
            "print(len(bad)); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    src = subprocess.run(["grep", "-rlE", r"^\s*(import prefect|from prefect)", "tlcm_core"], capture_output=True,
                         text=True)
    assert src.stdout == "", f"tlcm_core files importing prefect: {src.stdout}"
