"""FLUX.1 and SD3 LoRAs through the whole pipeline: teacher-trajectories, MLCD (3 iterations) and export run on the
tiny FLUX.1-dev- and SD3.5-shaped teachers of tests/tiny_flow.py saved as folders, then each exported file is loaded
by its own consumer: the stock `FluxPipeline` / `StableDiffusion3Pipeline` (`load_lora_weights`, `fuse_lora`), PEFT,
diffusers' converters of kohya LoRAs and of original FLUX / SD3 checkpoints, the shipped scheduler file, and
`tlcm generate`. Also: `lora.target_modules: auto` is the teacher family's list, an explicit list wins, and one
that matches nothing is refused before any stage runs.

Exactness: the LoRA's alpha / rank is 2, a power of two, so folding it into lora_B is exact and every fused weight
is bit-equal to our merge (W + (alpha / r) B A); kohya's fused q/k/v layout splits back into the very A and B."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_flow import MAX_SEQ, RES, tiny_flux, tiny_sd3

from tlcm_core.config import LoRAConfig, load_config
from tlcm_core.families import FAMILIES
from tlcm_core.lora import LoRAError, attach_lora, load_lora_into, lora_metadata, merge_lora, read_lora
from tlcm_core.lora_files import Usage, lora_modules, to_diffusers, to_kohya_flow
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter

PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
EXACT = dict(rtol=0.0, atol=0.0)
KOHYA = "kohya/tlcm_lora.safetensors"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-teachers")
    tiny_flux().save_pretrained(root / "flux")
    tiny_sd3().save_pretrained(root / "sd3")
    return root


def _config(teachers: Path, family: str, store: Path, *extra: str):
    return load_config("toy-fast", [
        f"teacher.source={teachers / family}", f"teacher.max_sequence_length={MAX_SEQ}", f"store.url={store}",
        "stages=[teacher-trajectories,mlcd,export]", "compute.device=cpu", "schedule.guidance=3.5",
        "trajectories.num_samples=8", "trajectories.shard_size=8", "mlcd.iterations=3", "mlcd.batch_size=4",
        "lora.rank=4", "lora.alpha=8", *extra])


@pytest.fixture(scope="module")
def runs(teachers, tmp_path_factory):
    """family -> the run's config, its MLCD artifact and its export folder."""
    out = {}
    for family in PIPELINES:
        store = tmp_path_factory.mktemp(f"store-{family}")
        cfg = _config(teachers, family, store)
        res = run_pipeline(cfg, reporter=SilentReporter())
        assert [r.stage for r in res] == ["teacher-trajectories", "mlcd", "export"]
        out[family] = SimpleNamespace(cfg=cfg, lora=open_store(cfg).artifact("mlcd", res[1].fingerprint),
                                      export=store / "export" / res[2].fingerprint, teacher=teachers / family)
    return out


def _weights(net) -> dict[str, torch.Tensor]:
    """A network's weights by their plain names (a merged PEFT layer's base_layer under its own name)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in net.state_dict().items() if "lora_" not in k}


def _stock(run, family: str):
    return PIPELINES[family].from_pretrained(str(run.teacher))


def _ours_merged(run, family: str) -> dict[str, torch.Tensor]:
    """The transformer with the trained LoRA merged by our own code: W + (alpha / r) B A."""
    lf = read_lora(run.lora)
    pipe = _stock(run, family)
    load_lora_into(pipe.transformer, lf.state, lf.config)
    merge_lora(pipe.transformer)
    return _weights(pipe.transformer)


# -- the LoRA's targets -----------------------------------------------------------------------------------------------


def test_the_loras_default_targets_are_the_familys(runs):
    for family, run in runs.items():
        lf = read_lora(run.lora)
        assert run.cfg.lora.target_modules == "auto" and lf.family == family
        assert lf.config.target_modules == list(FAMILIES[family].lora_target_modules)  # recorded resolved
        assert all(k.startswith("transformer.") for k in lf.state)
        assert run.lora.manifest().config["lora"]["target_modules"] == list(FAMILIES[family].lora_target_modules)
    flux = set(lora_modules(read_lora(runs["flux"].lora).state))
    # what only FLUX's (the official release's) list adapts: the single blocks' MLP input, adaLN, the embedders
    assert {"single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.norm1.linear", "x_embedder",
            "time_text_embed.guidance_embedder.linear_1", "norm_out.linear"} <= flux
    assert "transformer_blocks.0.attn.add_q_proj" in set(lora_modules(read_lora(runs["sd3"].lora).state))


def test_an_explicit_target_list_wins_and_one_that_matches_nothing_is_refused_before_training(teachers, tmp_path):
    net = tiny_flux().transformer
    attach_lora(net, LoRAConfig(rank=2, target_modules=["to_q"]))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in net.named_parameters() if ".lora_A." in n}
    assert adapted == {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"}
    meta = lora_metadata(LoRAConfig(rank=2, target_modules=["to_q"]), {"source": "x"}, "flux")
    assert json.loads(meta["lora_config"])["target_modules"] == ["to_q"] and meta["family"] == "flux"
    # the UNet's list on a FLUX teacher: one line naming the family and the network's layers, before any stage
    cfg = _config(teachers, "flux", tmp_path / "store", "lora.target_modules=[conv1,time_emb_proj]")
    with pytest.raises(LoRAError, match=r"match no module of the flux teacher's FluxTransformer2DModel, whose layers "
                                        r"are .*proj_mlp.*lora.target_modules=auto"):
        run_pipeline(cfg, reporter=SilentReporter())
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


# -- diffusers --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(PIPELINES))
def test_the_diffusers_file_loads_in_the_stock_pipeline_and_fuses_to_our_merge(runs, family):
    run = runs[family]
    pipe = _stock(run, family)
    before = _weights(pipe.transformer)
    pipe.load_lora_weights(str(run.export / "diffusers"), adapter_name="tlcm")
    modules = lora_modules(read_lora(run.lora).state)
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A.tlcm." in n}
    assert loaded == set(modules) and pipe.transformer.peft_config["tlcm"].lora_alpha == 4  # alpha := r, folded
    pipe.fuse_lora(adapter_names=["tlcm"])
    pipe.unload_lora_weights()
    fused = _weights(pipe.transformer)
    changed = {k[:-len(".weight")] for k in fused if not torch.equal(fused[k], before[k])}
    # the weights change exactly where MLCD moved the LoRA off zero (SD3's last block discards the text stream's
    # output, so its text queries get no gradient and keep B = 0)
    trained = {m for m, (a, b) in modules.items() if b.abs().max() > 0}
    assert changed == trained and len(trained) >= len(modules) - 1
    ours = _ours_merged(run, family)
    for k in fused:
        torch.testing.assert_close(fused[k], ours[k], **EXACT)


# -- kohya / ComfyUI --------------------------------------------------------------------------------------------------


def test_flux_kohya_file_fuses_to_the_diffusers_files_weights(runs):
    """The stock FluxPipeline loads the kohya file (original BFL names, q/k/v fused) to the diffusers file's weights.
    Two limits of diffusers 0.42's kohya converter, not of the file: it splits `single_blocks.N.linear1` at FLUX.1's
    full widths (3072 x 3 + 12288), so the tiny model's linear1 LoRA is left out here (the full-size layout is
    checked in the next test), and it returns the embedders' and final layer's LoRAs without the `transformer.`
    prefix, so load_lora_weights drops them (ComfyUI applies them)."""
    run = runs["flux"]
    kohya = load_file(run.export / KOHYA)
    meta = safe_open(str(run.export / KOHYA), "pt").metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("flux1", "flux-1-dev/lora")
    for k, v in kohya.items():  # the scale is folded into lora_up: alpha / rank = 1 everywhere
        if k.endswith(".alpha"):
            assert v.item() == kohya[k.replace(".alpha", ".lora_down.weight")].shape[0]
    pipe = _stock(run, "flux")
    before = _weights(pipe.transformer)
    pipe.load_lora_weights({k: v for k, v in kohya.items() if "_linear1." not in k}, adapter_name="k")
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A.k." in n}
    pipe.fuse_lora(adapter_names=["k"])
    pipe.unload_lora_weights()
    fused, ours = _weights(pipe.transformer), _ours_merged(run, "flux")
    blocks = {m for m in lora_modules(read_lora(run.lora).state) if "transformer_blocks." in m}
    linear1 = {m for m in blocks if m.startswith("single_") and (".attn.to_" in m or m.endswith("proj_mlp"))}
    assert blocks - linear1 <= loaded  # (diffusers 0.42 leaves out the embedders and the final layer)
    for k in fused:
        module = k.rsplit(".", 1)[0]
        torch.testing.assert_close(fused[k], ours[k] if module in loaded else before[k], rtol=1e-6, atol=1e-7)


def _full_size_flux_lora(rank: int = 2) -> tuple[dict, dict, LoRAConfig]:
    """A random LoRA on every FLUX target of FLUX.1-dev's widths (one double and one single block; no weights)."""
    from accelerate import init_empty_weights

    config = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    with init_empty_weights():
        net = FluxTransformer2DModel(**config)
    lora = LoRAConfig(rank=rank, alpha=2 * rank)
    targets = FAMILIES["flux"].lora_target_modules
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g)
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g)
    return state, {**config, "_class_name": "FluxTransformer2DModel"}, lora


def test_flux_kohya_layout_at_full_size_is_what_diffusers_kohya_converter_reads():
    """At FLUX.1-dev's widths diffusers' kohya converter (FluxPipeline.lora_state_dict) turns every fused layer back
    into the diffusers file's exact A and B: q/k/v of both streams, the single blocks' q/k/v + MLP input, and the
    final layer's scale/shift swap."""
    state, net_config, lora = _full_size_flux_lora()
    kohya, _ = to_kohya_flow(state, lora, {"source": "flux-dev"}, "flux", net_config, Usage())
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 4 * 2)
    converted = FluxPipeline.lora_state_dict(dict(kohya))
    theirs = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    ours, _ = to_diffusers(state, lora, {"source": "flux-dev"}, "flux")
    assert theirs.keys() == ours.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], **EXACT)


class _Recorder(dict):
    """A checkpoint for diffusers' converters of original FLUX / SD3 checkpoints that records which weights they
    read; a weight not given reads as zeros of a length every split in those converters divides (21504 rows: FLUX.1's
    single-block linear1)."""

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.read: set[str] = set()

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key) if key in self else torch.zeros(3 * 3072 + 12288)


def _convert_original(family: str, net_config: dict, tensors: dict) -> tuple[dict, dict[str, str]]:
    """Run diffusers' converter of an original checkpoint holding `tensors` (the rest zeros): (diffusers weights,
    ComfyUI's `lora_unet_<name>` key -> the original weight it patches, for every weight the converter reads)."""
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    zeros = torch.zeros(3 * 3072 + 12288)
    if family == "flux":  # the converter counts the blocks from the checkpoint's keys
        present = {f"double_blocks.{i}.img_attn.qkv.weight": zeros for i in range(net_config["num_layers"])}
        present.update({f"single_blocks.{i}.linear1.weight": zeros for i in range(net_config["num_single_layers"])})
        present.update({"guidance_in.in_layer.weight": zeros} if net_config.get("guidance_embeds") else {})
        convert = convert_flux_transformer_checkpoint_to_diffusers
    else:
        present = {f"joint_blocks.{i}.x_block.attn.qkv.weight": zeros for i in range(net_config["num_layers"])}
        present.update({f"joint_blocks.{i}.x_block.attn2.qkv.weight": zeros
                        for i in net_config.get("dual_attention_layers", ())})
        present["context_embedder.weight"] = zeros
        convert = convert_sd3_transformer_checkpoint_to_diffusers
    ckpt = _Recorder({**present, **tensors})
    converted = convert(ckpt)
    names = {"lora_unet_" + w[:-len(".weight")].replace(".", "_"): w for w in ckpt.read if w.endswith(".weight")}
    return converted, names


def _kohya_layers(kohya: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """lora_unet_<name> -> (lora_down, lora_up)."""
    return {k[:-len(".lora_down.weight")]: (v, kohya[k.replace("lora_down", "lora_up")])
            for k, v in kohya.items() if k.endswith(".lora_down.weight")}


def _broad_sd3_lora() -> tuple[dict, dict, LoRAConfig]:
    """A random LoRA on every linear and convolution layer of a 2-block SD3.5-shaped transformer whose first block has
    SD3.5 Medium's second attention: embedders, adaLN (the last block's context norm swaps scale and shift), both
    attentions, MLPs, the final layer."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
                                qk_norm="rms_norm", dual_attention_layers=(0,))
    lora = LoRAConfig(rank=2, alpha=4, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
        "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "linear", "linear_1", "linear_2",
        "context_embedder", "proj_out", "pos_embed.proj"])
    attach_lora(net, lora)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    from tlcm_core.lora import lora_state_dict

    return lora_state_dict(net), {**dict(net.config), "_class_name": "SD3Transformer2DModel"}, lora


def test_kohya_names_are_weights_of_the_original_checkpoints(runs):
    """ComfyUI's rule: `lora_unet_<name>` patches the weight `<name>.weight` of the original checkpoint (BFL's FLUX,
    Stability's MMDiT). Every exported layer is a weight that diffusers' converter of such checkpoints reads."""
    state, flux_config, lora = _full_size_flux_lora()
    sd3_state, sd3_config, sd3_lora = _broad_sd3_lora()
    cases = [("flux", load_file(runs["flux"].export / KOHYA), json.loads((runs["flux"].teacher / "transformer" /
                                                                           "config.json").read_text())),
             ("flux", to_kohya_flow(state, lora, {}, "flux", flux_config, Usage())[0], flux_config),
             ("sd3", load_file(runs["sd3"].export / KOHYA), json.loads((runs["sd3"].teacher / "transformer" /
                                                                         "config.json").read_text())),
             ("sd3", to_kohya_flow(sd3_state, sd3_lora, {}, "sd3", sd3_config, Usage())[0], sd3_config)]
    for family, kohya, config in cases:
        _, names = _convert_original(family, config, {})
        missing = [k for k in _kohya_layers(kohya) if k not in names]
        assert not missing, (family, missing)


def test_sd3_kohya_file_applied_as_comfyui_does_is_the_diffusers_files_update():
    """The kohya file's updates (up @ down x alpha / rank) on the original SD3 weights, converted by diffusers'
    SD3 checkpoint converter, are the diffusers file's B A on every module: q/k/v split as diffusers splits the fused
    qkv, and the scale/shift halves of the final and the last context norm in diffusers' order. (diffusers itself
    loads no kohya SD3 LoRA; ComfyUI and kohya-ss do.)"""
    state, config, lora = _broad_sd3_lora()
    kohya, meta = to_kohya_flow(state, lora, {"source": "sd35"}, "sd3", config, Usage())
    assert (meta["ss_base_model_version"], meta["ss_network_module"]) == ("sd3", "networks.lora_sd3")
    _, names = _convert_original("sd3", config, {})
    updates = {}
    for key, (down, up) in _kohya_layers(kohya).items():
        scale = kohya[f"{key}.alpha"].item() / down.shape[0]
        delta = (up.flatten(1).double() @ down.flatten(1).double() * scale).float()
        updates[names[key]] = delta.reshape(up.shape[0], *down.shape[1:])
    converted, _ = _convert_original("sd3", config, updates)
    ours, _ = to_diffusers(state, lora, {}, "sd3")
    for m, (a, b) in lora_modules(ours).items():
        expected = (b.flatten(1).double() @ a.flatten(1).double()).float().reshape(b.shape[0], *a.shape[1:])
        torch.testing.assert_close(converted[f"{m}.weight"], expected, rtol=1e-6, atol=1e-7, msg=m)


# -- PEFT, the scheduler, the card, the CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(PIPELINES))
def test_peft_adapter_loads_and_merges_to_our_weights(runs, family):
    from peft import PeftModel

    run = runs[family]
    config = json.loads((run.export / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(FAMILIES[family].lora_target_modules)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    merged = PeftModel.from_pretrained(_stock(run, family).transformer, str(run.export / "peft")).merge_and_unload()
    ours = _ours_merged(run, family)
    for k, v in _weights(merged).items():
        torch.testing.assert_close(v, ours[k], rtol=1e-6, atol=1e-7)


def _shipped_scheduler(export: Path):
    spec = importlib.util.spec_from_file_location("scheduling_flow_tlcm", export / "scheduler" /
                                                  "scheduling_flow_tlcm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FlowMatchTLCMScheduler


@pytest.mark.parametrize("family", list(PIPELINES))
def test_the_shipped_scheduler_runs_standalone_in_the_stock_pipeline(runs, family):
    run = runs[family]
    source = (run.export / "scheduler" / "scheduling_flow_tlcm.py").read_text()
    assert "tlcm_core" not in "\n".join(ln for ln in source.splitlines() if ln.startswith(("import", "from")))
    cls = _shipped_scheduler(run.export)
    assert cls.__module__ == "scheduling_flow_tlcm"
    sched_cfg = json.loads((run.export / "scheduler" / "scheduler_config.json").read_text())
    assert (sched_cfg["_class_name"], sched_cfg["segments"], sched_cfg["sampler"]) == ("FlowMatchTLCMScheduler", 8,
                                                                                       "renoise")
    pipe = _stock(run, family)
    pipe.scheduler = cls.from_pretrained(str(run.export), subfolder="scheduler")
    pipe.load_lora_weights(str(run.export / "diffusers"), adapter_name="tlcm")

    def sample(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        pipe.scheduler.set_noise_generator(g)
        return pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, height=RES, width=RES,
                    max_sequence_length=MAX_SEQ, generator=g, output_type="latent").images

    a, b = sample(0), sample(0)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, sample(1))
    # the TLCM milestones 999, 749, 499, 124 at the base's shifted sigmas (index 999 is sigma 1)
    assert len(pipe.scheduler.timesteps) == 4 and pipe.scheduler.timesteps[0].item() == 1000.0


def test_model_card_and_cli_export_of_a_flux_lora(runs, tmp_path):
    from flows.cli import main

    run = runs["flux"]
    card = (run.export / "README.md").read_text()
    for text in ("from diffusers import FluxPipeline", 'FlowMatchTLCMScheduler.from_pretrained("EXPORT_DIR", '
                 'subfolder="scheduler")', "pipe.scheduler.set_noise_generator(g)", "guidance_scale=1.0",
                 f"max_sequence_length={MAX_SEQ}", "guidance embedding at 1.0", "LoraLoaderModelOnly",
                 "PeftModel.from_pretrained(pipe.transformer"):
        assert text in card, text
    assert not (run.export / "comfyui").exists()  # no ComfyUI workflow for flow teachers (docs/exports.md)
    assert main(["export", "--lora", run.lora.uri, "--out", str(tmp_path / "cli")]) == 0
    for rel in (KOHYA, "diffusers/pytorch_lora_weights.safetensors", "peft/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "cli" / rel), load_file(run.export / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_tlcm_generate_writes_a_flux_image(runs, tmp_path):
    """`tlcm generate` on the export folder: the stock FluxPipeline, the LoRA, FlowMatchTLCMScheduler with its noise
    generator; the same seed gives the same picture, it is the stock pipeline's with the shipped scheduler."""
    from PIL import Image

    from flows.cli import main

    run = runs["flux"]
    for name in ("a.png", "b.png"):
        assert main(["generate", "--lora", str(run.export), "--prompt", "a red circle", "--steps", "2", "--seed",
                     "3", "--out", str(tmp_path / name), "--device", "cpu"]) == 0
    im = Image.open(tmp_path / "a.png")
    assert im.format == "PNG" and im.size == (256, 256)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    pipe = _stock(run, "flux")
    pipe.scheduler = _shipped_scheduler(run.export).from_pretrained(str(run.export), subfolder="scheduler")
    pipe.load_lora_weights(str(run.export / "diffusers"), adapter_name="tlcm")
    pipe.fuse_lora(adapter_names=["tlcm"])
    g = [torch.Generator().manual_seed(3)]
    pipe.scheduler.set_noise_generator(g)
    ref = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, height=RES, width=RES,
               max_sequence_length=MAX_SEQ, generator=g).images[0]
    assert im.resize((RES, RES), Image.NEAREST).tobytes() == ref.tobytes()
