"""The export as ComfyUI / A1111 users load it, on the tiny random SDXL-shaped base (and tiny / meta-device SD 1.x and
SDXL-sized UNets): the kohya file's metadata, the ComfyUI workflow, the model card's sampler comparison, every kohya
key under ComfyUI's own LoRA key naming (tests/comfy_keys.py), and that the default export writes every format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from comfy_keys import comfy_lora_key_map, comfy_unet_config, diffusers_to_sgm, load_like_comfy
from safetensors import safe_open
from safetensors.torch import load, load_file
from tiny_lora import LORA, teacher, trained_lora

from tlcm_core.config import OFFICIAL_TARGET_MODULES, ExportConfig, LoRAConfig, load_config
from tlcm_core.lora_files import (COMFY_WORKFLOW, KOHYA_FILE, SGM_IMPLEMENTATION, Usage, base_configs, base_family,
                                  comfy_checkpoint_name, comfy_simple_timesteps, comfy_workflow, export_files,
                                  lora_modules, sgm_module_path, to_kohya, write_files)

ALL_FORMATS = ["diffusers", "kohya", "peft"]


@pytest.fixture(scope="module")
def configs():
    return base_configs(teacher())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, configs):
    """The default export (ExportConfig's formats) of the tiny LoRA (rank 4, alpha 8)."""
    state, meta = trained_lora()
    out = tmp_path_factory.mktemp("export")
    write_files(export_files(state, meta, ExportConfig().formats, *configs, segments=8, steps=4), str(out))
    return out


def _weight_modules(unet: torch.nn.Module) -> dict[str, torch.Size]:
    """Diffusers path -> weight shape of every module with a weight (what ComfyUI's table can name)."""
    return {n: m.weight.shape for n, m in unet.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}


@pytest.fixture(scope="module")
def tiny_sdxl_unet(configs):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(configs[0])


# ---------------------------------------------------------------------------------------------------------------------
# metadata


def _kohya(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_kohya_metadata_matches_the_lora(exported):
    meta, tensors = _kohya(exported / KOHYA_FILE)
    # kohya-ss sd-scripts keys
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(LORA.rank) and float(meta["ss_network_alpha"]) == LORA.alpha
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {LORA.rank}
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {LORA.alpha}
    # the LoRA has 3x3 convolutions (conv1/conv2/downsamplers): kohya's networks.lora needs conv_dim/conv_alpha
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(LORA.rank), "conv_alpha": str(float(LORA.alpha))}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == teacher().source and meta["ss_output_name"] == "tlcm_lora"
    # Stability ModelSpec keys
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == SGM_IMPLEMENTATION  # SGM tensor names, as kohya's SDXL LoRAs
    assert teacher().source in meta["modelspec.title"] and f"rank {LORA.rank}" in meta["modelspec.title"]
    assert meta["modelspec.resolution"] == "32x32" and meta["modelspec.prediction_type"] == "epsilon"
    hint = meta["modelspec.usage_hint"]
    assert all(s in hint for s in ("4 steps", "2-8", "CFG 1.0", "sampler lcm", "scheduler simple"))
    desc = meta["modelspec.description"]
    assert "999, 749, 499, 124" in desc and "999, 749, 499, 249" in desc and "lcm" in desc
    assert json.loads(meta["tlcm_sampling"])["timesteps"] == {"2": [999, 499], "4": [999, 749, 499, 124],
                                                              "8": [999, 874, 749, 624, 499, 374, 249, 124]}
    # hash_sha256: of the tensor data after the header, as ModelSpec defines it
    raw = (exported / KOHYA_FILE).read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()


def test_kohya_metadata_follows_rank_alpha_and_base(configs):
    lcfg = LoRAConfig(rank=2, alpha=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    state, _ = trained_lora(seed=3, lora=lcfg)  # (made with every target module: keep the attention ones)
    state = {k: v for k, v in state.items() if any(f".{t}.lora_" in k for t in lcfg.target_modules)}
    _, meta = to_kohya(state, lcfg, {"source": "x/y", "resolution": 1024}, configs[0])
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")
    assert json.loads(meta["ss_network_args"]) == {}  # linear layers only
    assert meta["modelspec.resolution"] == "1024x1024"
    # the base model's family from its UNet / scheduler config
    sd1 = {"cross_attention_dim": 768}
    sd2 = {"cross_attention_dim": 1024}
    assert (base_family(sd1).kohya, base_family(sd1).architecture) == ("sd_v1", "stable-diffusion-v1")
    assert (base_family(sd2).kohya, base_family(sd2).architecture) == ("sd_v2", "stable-diffusion-v2-512")
    v = base_family(sd2, "v_prediction")
    assert (v.kohya, v.architecture, v.prediction, v.resolution) == ("sd_v2_v", "stable-diffusion-v2-768-v", "v", 768)
    xl = base_family(configs[0])
    assert (xl.kohya, xl.architecture, xl.resolution) == ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024)
    _, meta = to_kohya(state, lcfg, {"source": "x/y"}, configs[0], naming="diffusers")
    assert meta["modelspec.implementation"] == "diffusers"


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI workflow (API format) and the sampler comparison

# ComfyUI's node definitions (nodes.py) for the nodes the workflow uses: output types, and the type of each link input
OUTPUTS = {"CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"], "LoraLoader": ["MODEL", "CLIP"],
           "CLIPTextEncode": ["CONDITIONING"], "EmptyLatentImage": ["LATENT"], "KSampler": ["LATENT"],
           "VAEDecode": ["IMAGE"], "SaveImage": []}
LINKS = {"LoraLoader": {"model": "MODEL", "clip": "CLIP"}, "CLIPTextEncode": {"clip": "CLIP"},
         "KSampler": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                      "latent_image": "LATENT"},
         "VAEDecode": {"samples": "LATENT", "vae": "VAE"}, "SaveImage": {"images": "IMAGE"}}


def _node(wf: dict, class_type: str) -> tuple[str, dict]:
    (found,) = [(i, n) for i, n in wf.items() if n["class_type"] == class_type]
    return found


def test_workflow_is_a_valid_api_graph_with_tlcm_sampling(exported):
    wf = json.loads((exported / COMFY_WORKFLOW).read_text())
    assert all(set(n) == {"class_type", "inputs", "_meta"} for n in wf.values())  # API format: id -> node
    for node in wf.values():
        links = {k: v for k, v in node["inputs"].items() if isinstance(v, list)}
        assert set(links) == set(LINKS.get(node["class_type"], {})), node
        for name, (src, idx) in links.items():
            assert OUTPUTS[wf[src]["class_type"]][idx] == LINKS[node["class_type"]][name], (node, name)
    ckpt_id, ckpt = _node(wf, "CheckpointLoaderSimple")
    lora_id, lora = _node(wf, "LoraLoader")
    assert ckpt["inputs"]["ckpt_name"] == f"{Path(teacher().source).name}.safetensors"
    assert lora["inputs"]["lora_name"] == Path(KOHYA_FILE).name == "tlcm_lora.safetensors"
    assert lora["inputs"]["model"] == [ckpt_id, 0] and lora["inputs"]["strength_model"] == 1.0
    _, ks = _node(wf, "KSampler")
    assert ks["inputs"]["model"] == [lora_id, 0]  # the sampler runs the LoRA'd model, not the base
    assert {k: ks["inputs"][k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")} == \
        {"steps": 4, "cfg": 1.0, "sampler_name": "lcm", "scheduler": "simple", "denoise": 1.0}
    _, latent = _node(wf, "EmptyLatentImage")
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (32, 32)
    # the base's single-file checkpoint under its hub name; the deterministic sampler maps to euler
    assert comfy_checkpoint_name("stabilityai/stable-diffusion-xl-base-1.0") == "sd_xl_base_1.0.safetensors"
    multistep = comfy_workflow({"source": "a/b"}, {"addition_embed_type": "text_time"}, Usage(sampler="multistep"))
    assert _node(multistep, "KSampler")[1]["inputs"]["sampler_name"] == "euler"
    assert _node(multistep, "EmptyLatentImage")[1]["inputs"]["width"] == 1024


def _comfy_simple_reference(steps: int, scheduler_config: dict) -> list[int]:
    """ComfyUI's simple scheduler on the base's discrete sigmas, and the timestep ComfyUI then evaluates the model at
    (ModelSamplingDiscrete.timestep: the nearest log-sigma), straight from the schedule."""
    from tlcm_core.schedule import NoiseSchedule

    sch = NoiseSchedule.from_config(scheduler_config)
    acp = torch.tensor([float(sch.coeffs(t, torch.zeros(()))[0]) ** 2 for t in range(sch.T)], dtype=torch.float64)
    sigmas = ((1 - acp) / acp).sqrt()
    picked = [sigmas[-(1 + int(x * (len(sigmas) / steps)))] for x in range(steps)]
    return [int((sigmas.log() - s.log()).abs().argmin()) for s in picked]


def test_model_card_states_the_timestep_difference(exported, configs):
    for n in (1, 2, 3, 4, 8):
        assert comfy_simple_timesteps(n) == _comfy_simple_reference(n, configs[1]), n
    card = (exported / "README.md").read_text()
    assert f"`{COMFY_WORKFLOW}`" in card and "sampler `lcm`, scheduler `simple`" in card
    assert "| 2 | 999, 499 | 999, 499 | none |" in card
    assert "| 4 | 999, 749, 499, 124 | 999, 749, 499, 249 | step 4: 249 instead of 124 |" in card
    eight = "999, 874, 749, 624, 499, 374, 249, 124"
    assert f"| 8 | {eight} | {eight} | none |" in card


# ---------------------------------------------------------------------------------------------------------------------
# every kohya key under ComfyUI's LoRA key naming


def _check_keys_map(tensors: dict, unet_config: dict, weights: dict[str, torch.Size], state: dict) -> dict:
    """Load `tensors` as ComfyUI does; every key is taken, and each patch lands on the module the LoRA trained, with
    matching shapes and the trained tensors. Returns {lora name: SGM module}."""
    patched, unloaded = load_like_comfy(set(tensors), comfy_lora_key_map(unet_config, set(weights)))
    assert not unloaded, sorted(unloaded)[:5]
    to_diffusers = {s: d for d, s in diffusers_to_sgm(comfy_unet_config(unet_config)).items() if d in weights}
    trained = lora_modules(state)
    assert {to_diffusers[s] for s in patched.values()} == set(trained)
    for name, sgm in patched.items():
        module = to_diffusers[sgm]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        w = weights[module]
        assert up.shape[0] == w[0] and down.shape[1:] == w[1:], (name, module)  # up @ down reshapes to the weight
        assert torch.equal(down, trained[module][0]) and torch.equal(up, trained[module][1])
    return patched


def test_every_kohya_key_maps_under_comfy_naming(exported, configs, tiny_sdxl_unet, tmp_path):
    state, meta = trained_lora()
    weights = _weight_modules(tiny_sdxl_unet)
    sgm = _check_keys_map(load_file(str(exported / KOHYA_FILE)), configs[0], weights, state)
    assert all(not n.startswith("lora_unet_down_blocks") for n in sgm)  # SDXL: SGM names (ComfyUI rule 1)
    # the diffusers-named variant maps (rule 2) onto the very same SGM modules
    write_files(export_files(state, meta, ["kohya"], *configs, segments=8, kohya_naming="diffusers"), str(tmp_path))
    dif = _check_keys_map(load_file(str(tmp_path / KOHYA_FILE)), configs[0], weights, state)
    assert sorted(dif.values()) == sorted(sgm.values())


def test_a_wrong_key_does_not_map(exported, configs, tiny_sdxl_unet):
    key_map = comfy_lora_key_map(configs[0], set(_weight_modules(tiny_sdxl_unet)))
    tensors = load_file(str(exported / KOHYA_FILE))
    good = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    assert good in key_map and f"{good}.lora_up.weight" in tensors
    # tiny UNet, one resnet per level: input_blocks.2 is level 0's downsampler, output_blocks.0 has no upsampler
    for wrong in ("lora_unet_input_blocks_2_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_0_2_conv",
                  "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_3_1_attn1_to_q"):
        assert wrong not in key_map
    renamed = {(k.replace(good, good.replace("_3_1_", "_2_1_")) if k.startswith(good + ".") else k): v
               for k, v in tensors.items()}
    _, unloaded = load_like_comfy(set(renamed), key_map)
    assert unloaded == {f"lora_unet_input_blocks_2_1_transformer_blocks_0_attn1_to_q{s}"
                        for s in (".lora_up.weight", ".lora_down.weight", ".alpha")}


def test_sd1_kohya_keys_map_under_comfy_naming():
    from diffusers import UNet2DConditionModel

    from tlcm_core.lora import attach_lora, lora_state_dict

    sd1 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
               attention_head_dim=4, norm_num_groups=16)  # SD 1.x layout: proj_in/proj_out are 1x1 convolutions
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd1)
    unet_config, weights = dict(unet.config), _weight_modules(unet)
    lcfg = LoRAConfig(rank=2, alpha=4)
    attach_lora(unet, lcfg)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    state = lora_state_dict(unet)
    tensors, meta = to_kohya(state, lcfg, {"source": "tiny/sd1"}, unet_config)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    patched = _check_keys_map(tensors, unet_config, weights, state)
    assert all(n.startswith("lora_unet_down_blocks") or n.startswith(("lora_unet_mid", "lora_unet_up"))
               for n in patched)  # kohya's SD 1.x naming: diffusers module paths (ComfyUI rule 2)
    tensors, _ = to_kohya(state, lcfg, {"source": "tiny/sd1"}, unet_config, naming="sgm")
    assert sorted(_check_keys_map(tensors, unet_config, weights, state).values()) == sorted(patched.values())


SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("config", [SDXL_UNET, {"cross_attention_dim": 768}], ids=["sdxl-1.0", "sd-1.5"])
def test_comfy_table_and_export_names_agree_at_full_size(config):
    """On the real SDXL / SD 1.5 UNet layouts (meta device: no memory): ComfyUI's table names every weight, and the
    export's SGM names equal it for every module a TLCM LoRA targets; spot checks against well-known SDXL keys."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    cfg = dict(unet.config)
    weights = _weight_modules(unet)
    table = diffusers_to_sgm(comfy_unet_config(cfg))
    assert set(weights) <= set(table), sorted(set(weights) - set(table))[:5]
    targeted = [m for m in weights if any(m == t or m.endswith("." + t) for t in OFFICIAL_TARGET_MODULES)]
    assert len(targeted) > 100
    for m in targeted:
        assert sgm_module_path(m, cfg) == table[m], m
    if "addition_embed_type" in config:
        sgm = set(table[m] for m in weights)
        for known in ("input_blocks.4.1.transformer_blocks.1.attn2.to_k", "input_blocks.3.0.op", "input_blocks.6.0.op",
                      "middle_block.1.transformer_blocks.9.ff.net.2", "output_blocks.2.2.conv",
                      "output_blocks.5.2.conv", "output_blocks.8.0.skip_connection", "label_emb.0.0"):
            assert known in sgm, known


# ---------------------------------------------------------------------------------------------------------------------
# every format by default


def test_default_export_writes_every_format(tmp_path):
    from flows.cli import main
    from tlcm_core.pipeline import execute
    from tlcm_core.progress import SilentReporter
    from tlcm_core.stages import REGISTRY
    from tlcm_core.store import ArtifactStore

    assert ExportConfig().formats == ALL_FORMATS
    for preset in sorted(p.stem for p in Path("configs").glob("*.yaml")):
        assert load_config(preset).export.formats == ALL_FORMATS, preset
    expected = {"diffusers/pytorch_lora_weights.safetensors", KOHYA_FILE, COMFY_WORKFLOW,
                "peft/adapter_model.safetensors", "peft/adapter_config.json", "scheduler/scheduler_config.json",
                "scheduler/scheduling_tlcm.py", "README.md"}
    state, meta = trained_lora()
    store = ArtifactStore(str(tmp_path / "store"))
    lora_art = store.artifact("mlcd", "f" * 16)
    lora_art.save_tensors("lora.safetensors", state, metadata=meta)
    lora_art.commit(version=1, config={}, inputs={}, summary={})
    cfg = load_config("toy-fast", [f"teacher.source={teacher().source}", "lora.rank=4", "lora.alpha=8"])
    out = store.artifact("export", "e" * 16)
    summary = execute(REGISTRY["export"], cfg, {"lora": lora_art}, out, SilentReporter())
    assert set(summary["files"]) == expected and summary["formats"] == ALL_FORMATS
    # `tlcm export` without --formats: the same files; the same workflow and kohya tensors + metadata (safetensors
    # may order the header's metadata differently from one save to the next)
    assert main(["export", "--lora", lora_art.uri, "--out", str(tmp_path / "cli")]) == 0
    cli = {str(p.relative_to(tmp_path / "cli")) for p in (tmp_path / "cli").rglob("*") if p.is_file()}
    assert cli == expected
    assert (tmp_path / "cli" / COMFY_WORKFLOW).read_bytes() == out.read_bytes(COMFY_WORKFLOW)
    a, b = load(out.read_bytes(KOHYA_FILE)), load_file(str(tmp_path / "cli" / KOHYA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _kohya(tmp_path / "cli" / KOHYA_FILE)[0] == out.tensors_metadata(KOHYA_FILE)
