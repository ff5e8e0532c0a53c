"""Export round trips on a tiny random SDXL-shaped base: latents sampled with the in-training LoRA
(load_lora_into + tlcm_sample) equal those from each exported format loaded back by its own consumer.

Tolerance: exact (rtol = atol = 0) for diffusers, kohya and PEFT -- every consumer builds the same PEFT LoRA layers
and the test LoRA's alpha/rank = 2 is a power of two, so folding it into lora_B is exact. A non-power-of-two scale
(1.5) is folded with one float32 rounding per weight: 1e-5 relative on the UNet output."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from tiny_lora import LORA, PROMPTS, fresh_pipe, pipeline_latents, reference_latents, teacher, trained_lora

from tlcm_core.config import OFFICIAL_TARGET_MODULES, LoRAConfig
from tlcm_core.lora_files import ExportError, base_configs, export_files, lora_modules, sgm_module_path, write_files
from tlcm_core.lora import load_lora_into
from tlcm_core.models import Denoiser, encode_prompts
from tlcm_core.samplers import student_x0_fn, tlcm_sample
from tlcm_core.schedule import NoiseSchedule, milestones, sampler_timesteps
from tlcm_core.scheduler import TLCMScheduler

EXACT = dict(rtol=0.0, atol=0.0)
# Two loading paths that hand the same weights to the network in another memory layout (PEFT's own load_adapter, a
# kohya file converted by diffusers): the kernels may sum in another order. On an AMD EPYC they differ by at most
# 1.5e-5 in these tests (bit-equal on the Intel Xeons); a missing module or a wrong scale moves them by more than 1e-2.
ROUNDING = dict(rtol=0.0, atol=1e-4)
STEPS, SEED = 4, 11


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    state, meta = trained_lora()
    unet_cfg, sched_cfg = base_configs(teacher())
    metrics = [{"method": "tlcm-renoise", "steps": 4, "seconds_per_image": 0.01, "fid": 12.3, "clip_score": 30.1,
                "aesthetic_score": 5.5, "image_reward": 0.4}]
    files = export_files(state, meta, ["diffusers", "kohya", "peft"], unet_cfg, sched_cfg, segments=8,
                         training={"stage": "mlcd", "config": {"mlcd": {"lr": 1e-4}}}, metrics=metrics)
    out = tmp_path_factory.mktemp("export")
    write_files(files, str(out))
    return out


@pytest.fixture(scope="module")
def reference():
    return reference_latents(trained_lora()[0], STEPS, SEED)


def _with_scheduler(pipe, exported):
    pipe.scheduler = TLCMScheduler.from_pretrained(exported, subfolder="scheduler")
    return pipe


def test_diffusers_round_trip(exported, reference):
    pipe = _with_scheduler(fresh_pipe(), exported)
    pipe.load_lora_weights(str(exported / "diffusers"), adapter_name="tlcm")
    torch.testing.assert_close(pipeline_latents(pipe, STEPS, SEED), reference, **EXACT)
    # and the LoRA matters: without it the latents are far away
    pipe.disable_lora()
    assert (pipeline_latents(pipe, STEPS, SEED) - reference).abs().max() > 1.0


def test_diffusers_file_loads_every_module_at_its_scale(exported):
    """diffusers takes alpha = rank for a file without alphas (hence the folded scale), and it silently drops the
    attention modules of a file that mixes `lora.down` and `lora_A` names (as the training file does): the export
    writes lora_A/lora_B everywhere."""
    state, _ = trained_lora()
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(exported / "diffusers"), adapter_name="tlcm")
    loaded = [n for n, _ in pipe.unet.named_parameters() if ".lora_A.tlcm." in n]
    assert len(loaded) == len(lora_modules(state)) and any(".attn1.to_q." in n for n in loaded)
    assert pipe.unet.peft_config["tlcm"].lora_alpha == LORA.rank


def test_diffusers_fold_non_power_of_two_scale(tmp_path):
    lcfg = LoRAConfig(rank=4, alpha=6)
    state, meta = trained_lora(seed=2, lora=lcfg)
    files = export_files(state, meta, ["diffusers"], *base_configs(teacher()), segments=8)
    write_files(files, str(tmp_path))
    ours, theirs = fresh_pipe(), fresh_pipe()
    load_lora_into(ours.unet, state, lcfg)
    theirs.load_lora_weights(str(tmp_path / "diffusers"))
    cond, _ = encode_prompts(ours, PROMPTS, 32)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 499])
    with torch.no_grad():
        a = ours.unet(x, t, **cond.unet_kwargs()).sample
        b = theirs.unet(x, t, **cond.unet_kwargs()).sample
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_kohya_keys_and_round_trip(exported, reference):
    path = exported / "kohya" / "tlcm_lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_input_blocks_3_1_proj_in.alpha")
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    # SGM names, as kohya-ss writes SDXL LoRAs (toy UNet: one layer per block)
    for name in ("input_blocks_3_1_transformer_blocks_0_attn1_to_q", "input_blocks_2_0_op", "middle_block_1_proj_out",
                 "output_blocks_1_2_conv", "input_blocks_1_0_emb_layers_1", "output_blocks_0_0_skip_connection"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name
    assert float(alpha) == LORA.alpha and meta["ss_network_dim"] == str(LORA.rank)
    pipe = _with_scheduler(fresh_pipe(), exported)
    pipe.load_lora_weights(str(exported / "kohya"), weight_name="tlcm_lora.safetensors")
    torch.testing.assert_close(pipeline_latents(pipe, STEPS, SEED), reference, **EXACT)


def test_kohya_diffusers_naming_also_loads(tmp_path):
    state, meta = trained_lora()
    write_files(export_files(state, meta, ["kohya"], *base_configs(teacher()), segments=8, kohya_naming="diffusers"),
                str(tmp_path))
    ours, theirs = fresh_pipe(), fresh_pipe()
    load_lora_into(ours.unet, state, LORA)
    theirs.load_lora_weights(str(tmp_path / "kohya"), weight_name="tlcm_lora.safetensors")
    cond, _ = encode_prompts(ours, PROMPTS[:1], 32)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([749])
    with torch.no_grad():
        got = theirs.unet(x, t, **cond.unet_kwargs()).sample
        torch.testing.assert_close(got, ours.unet(x, t, **cond.unet_kwargs()).sample, **ROUNDING)
        assert (got - fresh_pipe().unet(x, t, **cond.unet_kwargs()).sample).abs().max() > 1e-2  # the LoRA acts


def test_sgm_names_of_sdxl_modules():
    sdxl = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
    expect = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_out": "input_blocks.8.1.proj_out",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2": "middle_block.1.transformer_blocks.9.ff.net.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.proj_in": "output_blocks.2.1.proj_in",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.resnets.0.conv2": "output_blocks.3.0.out_layers.3",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    }
    for diffusers_name, sgm in expect.items():
        assert sgm_module_path(diffusers_name, sdxl) == sgm
    with pytest.raises(ExportError, match="no SGM"):
        sgm_module_path("down_blocks.0.resnets.0.nonsense", sdxl)


def test_peft_as_the_official_release_loads_it(exported, reference):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = json.loads((exported / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (LORA.rank, LORA.alpha, "LORA")
    assert set(config["target_modules"]) == set(OFFICIAL_TARGET_MODULES)

    def sample(unet, pipe):
        schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
        cond, _ = encode_prompts(pipe, PROMPTS, 32)
        g = torch.Generator().manual_seed(SEED)
        x_T = torch.randn((2, 4, 16, 16), generator=g)
        return tlcm_sample(student_x0_fn(Denoiser(unet, schedule), cond), x_T,
                           sampler_timesteps(STEPS, milestones(1000, 8)), schedule, generator=g)

    # the official inference.py: LoraConfig(r, target_modules=[...]) + get_peft_model + load_adapter(path, "default")
    pipe = fresh_pipe()
    unet = get_peft_model(pipe.unet, LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                target_modules=list(OFFICIAL_TARGET_MODULES)))
    unet.load_adapter(str(exported / "peft"), adapter_name="default")
    torch.testing.assert_close(sample(unet, pipe), reference, **ROUNDING)
    # PeftModel.from_pretrained reads adapter_config.json (rank and alpha) itself
    pipe = fresh_pipe()
    unet = PeftModel.from_pretrained(pipe.unet, str(exported / "peft"))
    torch.testing.assert_close(sample(unet, pipe), reference, **ROUNDING)
    pipe = fresh_pipe()
    assert (sample(pipe.unet, pipe) - reference).abs().max() > 1e-2  # without the LoRA: far from it


def test_scheduler_export_is_standalone(exported):
    cfg = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "TLCMScheduler" and cfg["segments"] == 8 and cfg["sampler"] == "renoise"
    assert "timestep_spacing" not in cfg  # the base's Euler-only fields are not carried over
    source = (exported / "scheduler" / "scheduling_tlcm.py").read_text()
    assert "tlcm_core" not in "\n".join(ln for ln in source.splitlines() if ln.startswith(("import", "from")))
    spec = importlib.util.spec_from_file_location("scheduling_tlcm", exported / "scheduler" / "scheduling_tlcm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sched = mod.TLCMScheduler.from_pretrained(str(exported), subfolder="scheduler")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 124]


def test_model_card(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\nbase_model: ")
    assert f"rank {LORA.rank}, alpha {LORA.alpha:g}" in card
    assert 'pipe.load_lora_weights("EXPORT_DIR/diffusers", adapter_name="tlcm")' in card
    assert "get_peft_model(unet, lora_config)" in card
    assert "| tlcm-renoise | 4 | 0.01 | 12.3 | 30.1 | 5.5 | 0.4 |" in card
    assert '"lr": 0.0001' in card


def test_export_stage_and_cli(tmp_path):
    from flows.cli import main
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import execute
    from tlcm_core.stages import REGISTRY
    from tlcm_core.progress import SilentReporter
    from tlcm_core.store import ArtifactStore

    state, meta = trained_lora()
    store = ArtifactStore(str(tmp_path / "store"))
    lora_art = store.artifact("mlcd", "f" * 16)
    lora_art.save_tensors("lora.safetensors", state, metadata=meta)
    lora_art.commit(version=1, config={"mlcd": {"iterations": 6}}, inputs={}, summary={"loss": 0.1})
    cfg = load_config("toy-fast", [f"teacher.source={teacher().source}", "lora.rank=4", "lora.alpha=8",
                                   "export.formats=[diffusers,kohya,peft]"])
    out = store.artifact("export", "e" * 16)
    summary = execute(REGISTRY["export"], cfg, {"lora": lora_art}, out, SilentReporter())
    assert set(summary["files"]) >= {"diffusers/pytorch_lora_weights.safetensors", "kohya/tlcm_lora.safetensors",
                                     "peft/adapter_model.safetensors", "peft/adapter_config.json",
                                     "scheduler/scheduler_config.json", "README.md"}
    assert '"iterations": 6' in out.read_bytes("README.md").decode()
    # the CLI writes the same files from the artifact folder
    rc = main(["export", "--lora", lora_art.uri, "--out", str(tmp_path / "cli"), "--formats", "kohya"])
    assert rc == 0
    from safetensors.torch import load

    cli_raw = (tmp_path / "cli" / "kohya" / "tlcm_lora.safetensors").read_bytes()
    stage_raw = out.read_bytes("kohya/tlcm_lora.safetensors")
    a, b = load(cli_raw), load(stage_raw)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "cli" / "kohya" / "tlcm_lora.safetensors"), "pt") as f:
        assert f.metadata() == out.tensors_metadata("kohya/tlcm_lora.safetensors")
    assert not (tmp_path / "cli" / "diffusers").exists()
    assert json.loads((tmp_path / "cli" / "comfyui" / "tlcm_workflow.json").read_text())  # kohya brings the workflow
