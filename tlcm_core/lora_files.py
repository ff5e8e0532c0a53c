"""Stage `export` and `tlcm export`: a trained TLCM LoRA in the formats people load it with.

  diffusers/pytorch_lora_weights.safetensors  `pipe.load_lora_weights(folder)`; the LoRA scale alpha/rank is folded
                                              into lora_B (alpha := rank), because diffusers assumes alpha = rank
                                              when a file carries no alphas
  kohya/tlcm_lora.safetensors                 kohya-ss / ComfyUI / A1111 keys: `lora_unet_<module>.lora_down.weight`,
                                              `.lora_up.weight`, `.alpha`; SDXL modules under their SGM names
                                              (input_blocks_4_1_...) as kohya trains SDXL, other UNets under the
                                              diffusers module paths as kohya trains SD 1.x/2.x
  peft/adapter_model.safetensors              the layout the official TLCM release loads: `get_peft_model(unet,
  peft/adapter_config.json                    LoraConfig(r, target_modules=[...]))` + `load_adapter(folder, "default")`
                                              (keys `base_model.model.<module>.lora_A.weight`)
  scheduler/scheduler_config.json             `TLCMScheduler.from_pretrained(folder, subfolder="scheduler")`
  scheduler/scheduling_tlcm.py                the scheduler class itself (torch + diffusers only)
  README.md                                   model card: base model, LoRA and training config, metrics, usage

Every file is a pure function of the LoRA, its metadata and the base model's UNet/scheduler configs
(`export_files`), so the stage and the CLI write the same bytes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
import torch

from .config import LoRAConfig, TeacherConfig, toy_world
from .errors import UserError
from .lora import check_lora, lora_metadata

DIFFUSERS_FILE = "diffusers/pytorch_lora_weights.safetensors"
KOHYA_FILE = "kohya/tlcm_lora.safetensors"
PEFT_WEIGHTS = "peft/adapter_model.safetensors"
PEFT_CONFIG = "peft/adapter_config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
SCHEDULER_SOURCE = "scheduler/scheduling_tlcm.py"
MODEL_CARD = "README.md"


class ExportError(UserError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# The LoRA as (module path -> (A, B))


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """UNet module path -> (lora_A = down, lora_B = up) from a TLCM/diffusers `unet.`-prefixed state dict."""
    downs, ups = {}, {}
    for k, v in state.items():
        if not k.startswith("unet."):
            raise ExportError(f"unexpected key {k!r}: a TLCM LoRA has only `unet.` keys")
        body = k[len("unet."):]
        for suffix, into in ((".lora_A.weight", downs), (".lora.down.weight", downs), (".lora_B.weight", ups),
                             (".lora.up.weight", ups)):
            if body.endswith(suffix):
                into[body[: -len(suffix)]] = v
                break
        else:
            raise ExportError(f"unexpected key {k!r} (not a lora_A/lora_B weight)")
    if set(downs) != set(ups):
        odd = sorted(set(downs) ^ set(ups))
        raise ExportError(f"LoRA modules without both halves: {odd[:3]}")
    return {m: (downs[m], ups[m]) for m in sorted(downs)}


# ---------------------------------------------------------------------------------------------------------------------
# kohya names for SDXL: the SGM/LDM UNet module paths kohya-ss trains SDXL on


_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_module_path(path: str, unet_config: dict) -> str:
    """The SGM (original SDXL) name of a diffusers UNet2DConditionModel module, e.g.
    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in (layers_per_block = 2)."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    n_down = len(unet_config["down_block_types"])
    lpb = unet_config["layers_per_block"]
    down_layers = [lpb] * n_down if isinstance(lpb, int) else list(lpb)
    up_layers = [n + 1 for n in reversed(down_layers)]
    p = path.split(".")

    def resnet(rest: list[str]) -> str:
        name = ".".join(rest)
        if name not in _SGM_RESNET:
            raise ExportError(f"no SGM name for resnet part {name!r} of {path}")
        return _SGM_RESNET[name]

    try:
        if p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            first = 1 + sum(n + 1 for n in down_layers[:i])  # input_blocks.0 is conv_in
            if kind == "resnets":
                return f"input_blocks.{first + int(p[3])}.0.{resnet(p[4:])}"
            if kind == "attentions":
                return f"input_blocks.{first + int(p[3])}.1." + ".".join(p[4:])
            if kind == "downsamplers" and p[3:] == ["0", "conv"]:
                return f"input_blocks.{first + down_layers[i]}.0.op"
        elif p[0] == "mid_block":
            kind, j = p[1], int(p[2])
            idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
            return f"middle_block.{idx}." + (resnet(p[3:]) if kind == "resnets" else ".".join(p[3:]))
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            first = sum(up_layers[:i])
            if kind == "resnets":
                return f"output_blocks.{first + int(p[3])}.0.{resnet(p[4:])}"
            if kind == "attentions":
                return f"output_blocks.{first + int(p[3])}.1." + ".".join(p[4:])
            if kind == "upsamplers" and p[3:] == ["0", "conv"]:
                # the upsampler follows the last layer's resnet (and its attention, in cross-attention blocks)
                has_attn = "CrossAttn" in unet_config["up_block_types"][i]
                return f"output_blocks.{first + up_layers[i] - 1}.{2 if has_attn else 1}.conv"
    except (IndexError, ValueError, KeyError):
        pass
    raise ExportError(f"no SGM (kohya SDXL) name for UNet module {path!r}")


def kohya_naming_for(unet_config: dict, naming: str = "auto") -> str:
    if naming != "auto":
        return naming
    return "sgm" if unet_config.get("addition_embed_type") == "text_time" else "diffusers"


# ---------------------------------------------------------------------------------------------------------------------
# The formats


def to_diffusers(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict) -> tuple[dict, dict[str, str]]:
    """diffusers keys with the scale alpha/rank folded into lora_B, so any diffusers version (which takes alpha = rank
    when a file has no alphas) applies the trained scale; the TLCM metadata then says alpha = rank."""
    scale = lora.alpha / lora.rank
    out = {}
    for m, (a, b) in lora_modules(state).items():
        out[f"unet.{m}.lora_A.weight"] = a.contiguous()
        out[f"unet.{m}.lora_B.weight"] = (b if scale == 1.0 else (b.double() * scale).to(b.dtype)).contiguous()
    folded = lora.model_copy(update={"alpha": float(lora.rank)})
    meta = lora_metadata(folded, base)
    meta["tlcm_folded_scale"] = repr(scale)
    return out, meta


def to_kohya(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict, unet_config: dict,
             naming: str = "auto") -> tuple[dict, dict[str, str]]:
    """kohya-ss LoRA: lora_down = A, lora_up = B, alpha = the trained alpha (consumers scale by alpha / rank)."""
    naming = kohya_naming_for(unet_config, naming)
    out = {}
    for m, (a, b) in lora_modules(state).items():
        name = "lora_unet_" + (sgm_module_path(m, unet_config) if naming == "sgm" else m).replace(".", "_")
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = b.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
            "ss_network_alpha": repr(float(lora.alpha)), "ss_network_args": json.dumps({}),
            "ss_base_model_version": "sdxl_base_v1-0" if naming == "sgm" else "sd_v1",
            "tlcm_lora_config": json.dumps(lora.model_dump(mode="json")),
            "tlcm_base_model": json.dumps(base, sort_keys=True)}
    return out, meta


def peft_config_for(lora: LoRAConfig, base: dict):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), base_model_name_or_path=base.get("source"),
                      revision=base.get("revision"))


def to_peft(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict) -> tuple[dict, bytes]:
    """A PEFT adapter of the UNet as `PeftModel.save_pretrained` writes it (weights + adapter_config.json)."""
    tensors = {}
    for m, (a, b) in lora_modules(state).items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
    with tempfile.TemporaryDirectory() as d:
        peft_config_for(lora, base).save_pretrained(d)  # peft's own serialisation of the config
        config = (Path(d) / "adapter_config.json").read_bytes()
    return tensors, config


def scheduler_files(base_scheduler_config: dict, segments: int, sampler: str) -> dict[str, bytes]:
    from .scheduler import TLCMScheduler

    sched = TLCMScheduler.from_base(base_scheduler_config, segments=segments, sampler=sampler)
    source = (Path(__file__).parent / "scheduler.py").read_bytes()
    return {SCHEDULER_CONFIG: sched.to_json_string().encode(), SCHEDULER_SOURCE: source}


def _safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Model card


def _pipeline_class(unet_config: dict) -> str:
    return "StableDiffusionXLPipeline" if unet_config.get("addition_embed_type") == "text_time" \
        else "StableDiffusionPipeline"


def model_card(lora: LoRAConfig, base: dict, unet_config: dict, formats: list[str], segments: int, sampler: str,
               steps: int, training: dict | None = None, metrics: list[dict] | None = None,
               name: str = "TLCM LoRA") -> str:
    from .evaluation import markdown_table

    src = base.get("source", "?")
    pipe_cls = _pipeline_class(unet_config)
    res = base.get("resolution")
    size = f", height={res}, width={res}" if res else ""
    example = "a red circle" if toy_world(src) else "a photo of a cat"
    lines = [
        "---", "library_name: diffusers", f"base_model: {src}", "tags:", "- text-to-image", "- lora", "- tlcm",
        "- few-step", "---", "", f"# {name}", "",
        f"A few-step LoRA for `{src}` distilled with TLCM (Xie et al., *TLCM: Training-efficient Latent Consistency "
        "Model for Image Generation with 2-8 Steps*, arXiv 2406.05768), data-free. Sample it with 2-8 steps, "
        f"guidance 0, on the TLCM milestone timesteps ({segments} segments, `{sampler}` sampler).", "",
        "## LoRA", "", f"- base model: `{json.dumps(base, sort_keys=True)}`",
        f"- rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.alpha / lora.rank:g}), UNet only",
        f"- target modules: {', '.join(f'`{t}`' for t in lora.target_modules)}", "",
        "## Files", "",
        "| file | for |", "|---|---|",
    ]
    if "diffusers" in formats:
        lines.append(f"| `{DIFFUSERS_FILE}` | diffusers `load_lora_weights` (alpha/rank folded into lora_B) |")
    if "kohya" in formats:
        lines.append(f"| `{KOHYA_FILE}` | kohya-ss, ComfyUI, A1111/Forge (`lora_unet_*` keys with `.alpha`) |")
    if "peft" in formats:
        lines.append(f"| `{PEFT_WEIGHTS}`, `{PEFT_CONFIG}` | PEFT `load_adapter`, as the official TLCM release |")
    lines += [f"| `{SCHEDULER_CONFIG}`, `{SCHEDULER_SOURCE}` | the TLCM scheduler (diffusers `SchedulerMixin`) |",
              "", "## Usage (diffusers)", "", "```python", "import sys", "", "import torch",
              f"from diffusers import {pipe_cls}", "",
              'sys.path.insert(0, "EXPORT_DIR/scheduler")  # scheduling_tlcm.py: torch + diffusers only',
              "from scheduling_tlcm import TLCMScheduler  # (or: from tlcm_core.scheduler import TLCMScheduler)", "",
              *(["from tlcm_core.toy import toy_teacher_path  # the toy world's teacher ships with tlcm", "",
                 f'pipe = {pipe_cls}.from_pretrained(toy_teacher_path("{src.partition(":")[2] or "toy"}"))']
                if toy_world(src) else [f'pipe = {pipe_cls}.from_pretrained("{src}")']),
              'pipe.scheduler = TLCMScheduler.from_pretrained("EXPORT_DIR", subfolder="scheduler")']
    if "diffusers" in formats:
        lines.append('pipe.load_lora_weights("EXPORT_DIR/diffusers", adapter_name="tlcm")')
    elif "kohya" in formats:
        lines.append('pipe.load_lora_weights("EXPORT_DIR/kohya", weight_name="tlcm_lora.safetensors")')
    lines += [f'image = pipe("{example}", num_inference_steps={steps}, guidance_scale=0{size},',
              "             generator=torch.Generator().manual_seed(0)).images[0]", "```", "",
              "Stack a style LoRA with `pipe.load_lora_weights(style, adapter_name=\"style\")` and "
              "`pipe.set_adapters([\"tlcm\", \"style\"], adapter_weights=[1.0, 0.8])`; the same scheduler works in "
              "`StableDiffusionXLControlNetPipeline`.", ""]
    if "peft" in formats:
        lines += ["## Usage (PEFT, as the official TLCM inference script)", "", "```python",
                  "from peft import LoraConfig, get_peft_model", "",
                  f"lora_config = LoraConfig(r={lora.rank}, lora_alpha={lora.alpha:g},",
                  f"                         target_modules={list(lora.target_modules)})",
                  "unet = get_peft_model(unet, lora_config)",
                  'unet.load_adapter("EXPORT_DIR/peft", adapter_name="default")', "```", "",
                  "Each step predicts x0 and re-noises it to the next milestone with fresh noise: "
                  "`TLCMScheduler` does exactly that.", ""]
    lines += ["## Command line (this project)", "", "```", f"tlcm generate --lora EXPORT_DIR --steps {steps} "
              f'--seed 0 --prompt "{example}" --out image.png', "```", ""]
    if metrics:
        lines += ["## Metrics", "", markdown_table(metrics), ""]
    if training:
        lines += ["## Training", "", "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Everything at once


def export_files(state: dict[str, torch.Tensor], metadata: dict[str, str], formats: list[str], unet_config: dict,
                 scheduler_config: dict, *, segments: int, sampler: str = "renoise", steps: int = 4,
                 kohya_naming: str = "auto", training: dict | None = None, metrics: list[dict] | None = None,
                 where: str = "LoRA") -> dict[str, bytes]:
    """Relative path -> bytes for every exported file of a TLCM LoRA (state + tlcm-lora/1 metadata)."""
    lora = check_lora(state, metadata, where=where)
    base = json.loads(metadata.get("base_model", "{}"))
    unknown = [f for f in formats if f not in ("diffusers", "kohya", "peft")]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; use diffusers, kohya, peft")
    files: dict[str, bytes] = {}
    if "diffusers" in formats:
        files[DIFFUSERS_FILE] = _safetensors_bytes(*to_diffusers(state, lora, base))
    if "kohya" in formats:
        files[KOHYA_FILE] = _safetensors_bytes(*to_kohya(state, lora, base, unet_config, kohya_naming))
    if "peft" in formats:
        tensors, config = to_peft(state, lora, base)
        files[PEFT_WEIGHTS] = _safetensors_bytes(tensors, {"format": "pt"})
        files[PEFT_CONFIG] = config
    files.update(scheduler_files(scheduler_config, segments, sampler))
    files[MODEL_CARD] = model_card(lora, base, unet_config, formats, segments, sampler, steps, training,
                                   metrics).encode()
    return files


def base_configs(teacher: TeacherConfig) -> tuple[dict, dict]:
    """The base model's UNet and scheduler configs (config files only; no weights are loaded)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from .models import resolve_teacher_source

    src = resolve_teacher_source(teacher)
    unet = UNet2DConditionModel.load_config(src, subfolder="unet", revision=teacher.revision)
    sched = DDIMScheduler.load_config(src, subfolder="scheduler", revision=teacher.revision)
    return dict(unet), dict(sched)


def write_files(files: dict[str, bytes], out: str) -> list[str]:
    """Write export files under a folder or fsspec URL (what `tlcm export` does); returns their URLs."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    urls = []
    for rel, data in sorted(files.items()):
        path = f"{root.rstrip('/')}/{rel}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
        urls.append(path if "://" not in out else f"{out.rstrip('/')}/{rel}")
    return urls


__all__ = ["ExportError", "export_files", "lora_modules", "model_card", "sgm_module_path",
           "to_diffusers", "to_kohya", "to_peft", "write_files"]
