"""Stage `export` and `tlcm export`: a trained TLCM LoRA in the formats people load it with.

  diffusers/pytorch_lora_weights.safetensors  `pipe.load_lora_weights(folder)`; the LoRA scale alpha/rank is folded
                                              into lora_B (alpha := rank), because diffusers assumes alpha = rank
                                              when a file carries no alphas
  kohya/tlcm_lora.safetensors                 kohya-ss / ComfyUI / A1111 keys: `lora_unet_<module>.lora_down.weight`,
                                              `.lora_up.weight`, `.alpha`; SDXL modules under their SGM names
                                              (input_blocks_4_1_...) as kohya trains SDXL, other UNets under the
                                              diffusers module paths as kohya trains SD 1.x/2.x; metadata: kohya's
                                              ss_* keys (dim, alpha, base model version) and Stability's modelspec.*
                                              keys (architecture, title, usage hint, ...)
  comfyui/tlcm_workflow.json                  (with kohya) a ComfyUI workflow in API format: base checkpoint +
                                              LoraLoader + KSampler(lcm, simple, cfg 1.0)
  peft/adapter_model.safetensors              the layout the official TLCM release loads: `get_peft_model(unet,
  peft/adapter_config.json                    LoraConfig(r, target_modules=[...]))` + `load_adapter(folder, "default")`
                                              (keys `base_model.model.<module>.lora_A.weight`)
  scheduler/scheduler_config.json             `TLCMScheduler.from_pretrained(folder, subfolder="scheduler")`
  scheduler/scheduling_tlcm.py                the scheduler class itself (torch + diffusers only)
  README.md                                   model card: base model, LoRA and training config, metrics, usage

Every file is a pure function of the LoRA, its metadata and the base model's UNet/scheduler configs
(`export_files`), so the stage and the CLI write the same bytes.

FLUX.1 and SD3 teachers (the LoRA adapts `pipe.transformer`; its family comes from the LoRA's metadata or the base's
transformer config) get the same three formats with their own names: the diffusers file under `transformer.`, the
kohya file under the original FLUX (Black Forest Labs) / SD3 (Stability MMDiT) layer names with q/k/v (and FLUX's
single-block MLP input) fused as those layers are (tlcm_core/flow_lora_names.py) and the LoRA scale folded into
`lora_up` (every `.alpha` = its module's rank), PEFT as for a UNet; `FlowMatchTLCMScheduler` ships as
scheduler/scheduling_flow_tlcm.py; no ComfyUI workflow (docs/exports.md).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import LoRAConfig, TeacherConfig, toy_teacher_kind, toy_world
from .errors import UserError
from .families import FAMILIES
from .flow_lora_names import IMPLEMENTATION, kohya_layers
from .lora import LoRAError, check_lora, family_targets, lora_metadata, split_prefix
from .schedule import milestones, sampler_timesteps

DIFFUSERS_FILE = "diffusers/pytorch_lora_weights.safetensors"
KOHYA_FILE = "kohya/tlcm_lora.safetensors"
COMFY_WORKFLOW = "comfyui/tlcm_workflow.json"
PEFT_WEIGHTS = "peft/adapter_model.safetensors"
PEFT_CONFIG = "peft/adapter_config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
SCHEDULER_SOURCE = "scheduler/scheduling_tlcm.py"
FLOW_SCHEDULER_SOURCE = "scheduler/scheduling_flow_tlcm.py"
MODEL_CARD = "README.md"


class ExportError(UserError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# The LoRA as (module path -> (A, B))


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Network module path -> (lora_A = down, lora_B = up) from a TLCM/diffusers state dict under `unet.` (SD/SDXL)
    or `transformer.` (FLUX.1, SD3)."""
    try:
        _, bodies = split_prefix(state)
    except LoRAError as e:
        raise ExportError(str(e)) from None
    downs, ups = {}, {}
    for body, v in bodies.items():
        for suffix, into in ((".lora_A.weight", downs), (".lora.down.weight", downs), (".lora_B.weight", ups),
                             (".lora.up.weight", ups)):
            if body.endswith(suffix):
                into[body[: -len(suffix)]] = v
                break
        else:
            raise ExportError(f"unexpected key {body!r} (not a lora_A/lora_B weight)")
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
# What the base model is, and how to sample the LoRA: shared by the kohya metadata, the ComfyUI workflow and the card


@dataclass(frozen=True)
class BaseFamily:
    """The base model's family under the names LoRA tools use for it."""

    kohya: str          # kohya-ss `ss_base_model_version` (sd-scripts: sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0)
    architecture: str   # Stability ModelSpec `modelspec.architecture` of the base (the LoRA adds "/lora")
    prediction: str     # ModelSpec `prediction_type`: epsilon or v
    resolution: int     # the family's native image side when the base config does not say


def base_family(unet_config: dict, prediction_type: str = "epsilon") -> BaseFamily:
    """SDXL (the text_time added embedding), SD 2.x (1024-wide cross-attention: OpenCLIP-H) or else SD 1.x."""
    v = prediction_type == "v_prediction"
    pred = "v" if v else "epsilon"
    if unet_config.get("addition_embed_type") == "text_time":
        return BaseFamily("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", pred, 1024)
    if unet_config.get("cross_attention_dim") == 1024:
        return BaseFamily("sd_v2_v" if v else "sd_v2", "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512",
                          pred, 768 if v else 512)
    return BaseFamily("sd_v1", "stable-diffusion-v1", pred, 512)


def comfy_simple_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps ComfyUI's `simple` scheduler visits: it takes every (T/N)-th of the model's T discrete sigmas from
    the top, sigma index T-1-floor(i*T/N) for i < N (comfy/samplers.py simple_scheduler), and the model is evaluated at
    exactly that index (ModelSamplingDiscrete.timestep: the nearest of the T log-sigmas)."""
    return [num_train_timesteps - 1 - int(i * (num_train_timesteps / steps)) for i in range(steps)]


# the ComfyUI sampler of each TLCM sampler: `lcm` is x0 + re-noising with fresh noise at the next sigma (TLCM's
# renoise); `euler` on a VE sigma grid with the model's x0 is the deterministic DDIM jump (TLCM's multistep)
COMFY_SAMPLER = {"renoise": "lcm", "multistep": "euler"}
COMFY_SCHEDULER = "simple"  # integer timesteps of the base's own table; equal to TLCM's milestones for 1, 2 and 8 steps


@dataclass(frozen=True)
class Usage:
    """How the exported LoRA is meant to be sampled (written into the kohya metadata, the workflow and the card)."""

    steps: int = 4
    segments: int = 8
    sampler: str = "renoise"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    milestone_grid: str = "official"
    schedule: Any = field(default=None, compare=False, repr=False)  # the base's noise levels (the sigma grid's input)

    def tlcm_timesteps(self, n: int) -> list[int]:
        return sampler_timesteps(n, milestones(self.num_train_timesteps, self.segments), self.milestone_grid,
                                 self.schedule)

    def comfy_timesteps(self, n: int) -> list[int]:
        return comfy_simple_timesteps(n, self.num_train_timesteps)

    def step_counts(self) -> list[int]:
        """The step counts the card compares (2, 4, 8 and the recommended one, at most one per segment)."""
        return sorted({n for n in (2, 4, 8, self.steps) if 1 <= n <= self.segments})

    def hint(self) -> str:
        lo, hi = min(2, self.segments), self.segments
        return (f"{self.steps} steps ({lo}-{hi}), CFG 1.0 (guidance-distilled: no CFG; diffusers guidance_scale 0), "
                f"sampler {COMFY_SAMPLER[self.sampler]}, scheduler {COMFY_SCHEDULER}, LoRA strength 1.0")


def usage_for(scheduler_config: dict, *, segments: int, sampler: str = "renoise", steps: int = 4,
              milestone_grid: str = "official", schedule=None) -> Usage:
    """`schedule`: the base's noise schedule, which the sigma grid chooses its milestones by."""
    return Usage(steps=steps, segments=segments, sampler=sampler,
                 num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
                 prediction_type=scheduler_config.get("prediction_type", "epsilon"), milestone_grid=milestone_grid,
                 schedule=schedule)


# ---------------------------------------------------------------------------------------------------------------------
# The formats


def _folded(b: torch.Tensor, scale: float) -> torch.Tensor:
    """lora_B with the LoRA scale alpha/rank multiplied in (one rounding to B's dtype)."""
    return b if scale == 1.0 else (b.double() * scale).to(b.dtype)


def to_diffusers(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict,
                 family: str = "unet") -> tuple[dict, dict[str, str]]:
    """diffusers keys (under `unet.`, or `transformer.` for FLUX.1 / SD3) with the scale alpha/rank folded into
    lora_B, so any diffusers version (which takes alpha = rank when a file has no alphas) applies the trained scale;
    the TLCM metadata then says alpha = rank."""
    scale = lora.alpha / lora.rank
    prefix = FAMILIES[family].network_part
    out = {}
    for m, (a, b) in lora_modules(state).items():
        out[f"{prefix}.{m}.lora_A.weight"] = a.contiguous()
        out[f"{prefix}.{m}.lora_B.weight"] = _folded(b, scale).contiguous()
    folded = lora.model_copy(update={"alpha": float(lora.rank)})
    meta = lora_metadata(folded, base, family)
    meta["tlcm_folded_scale"] = repr(scale)
    return out, meta


SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # ModelSpec's implementation id, as kohya


def to_kohya(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict, unet_config: dict,
             naming: str = "auto", usage: Usage | None = None) -> tuple[dict, dict[str, str]]:
    """kohya-ss LoRA: lora_down = A, lora_up = B, alpha = the trained alpha (consumers scale by alpha / rank), with
    the metadata LoRA managers show (kohya's ss_* keys, Stability's modelspec.* keys)."""
    naming = kohya_naming_for(unet_config, naming)
    usage = usage or Usage()
    out, convs = {}, False
    for m, (a, b) in lora_modules(state).items():
        name = "lora_unet_" + (sgm_module_path(m, unet_config) if naming == "sgm" else m).replace(".", "_")
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = b.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
        convs = convs or (a.ndim == 4 and a.shape[-1] > 1)
    meta = kohya_metadata(lora, base, unet_config, naming, usage, convs)
    meta["modelspec.hash_sha256"] = _tensor_hash(out)
    return out, meta


def kohya_metadata(lora: LoRAConfig, base: dict, unet_config: dict, naming: str, usage: Usage,
                   convs: bool) -> dict[str, str]:
    fam = base_family(unet_config, usage.prediction_type)
    src = base.get("source", "?")
    res = base.get("resolution") or fam.resolution
    # kohya's networks.lora trains 3x3 convolutions only with conv_dim / conv_alpha in its network args
    args = {"conv_dim": str(lora.rank), "conv_alpha": repr(float(lora.alpha))} if convs else {}
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
        "ss_network_alpha": repr(float(lora.alpha)), "ss_network_args": json.dumps(args),
        "ss_base_model_version": fam.kohya, "ss_v2": str(fam.kohya.startswith("sd_v2")),
        "ss_sd_model_name": src, "ss_output_name": Path(KOHYA_FILE).stem,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{fam.architecture}/lora",
        # the tensor names follow the SGM (Stability) UNet or the diffusers one
        "modelspec.implementation": SGM_IMPLEMENTATION if naming == "sgm" else "diffusers",
        "modelspec.title": f"TLCM {usage.segments}-segment LoRA (rank {lora.rank}) for {src}",
        "modelspec.description": _description(src, usage),
        "modelspec.usage_hint": usage.hint(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": fam.prediction,
        "modelspec.tags": "tlcm, few-step, lcm, distillation",
        "tlcm_lora_config": json.dumps(lora.model_dump(mode="json")),
        "tlcm_base_model": json.dumps(base, sort_keys=True),
        "tlcm_sampling": json.dumps({"steps": usage.steps, "segments": usage.segments, "sampler": usage.sampler,
                                     "timesteps": {str(n): usage.tlcm_timesteps(n) for n in usage.step_counts()}}),
    }


def _description(src: str, usage: Usage) -> str:
    n = usage.steps if usage.steps <= usage.segments else usage.step_counts()[-1]
    tlcm, comfy = (", ".join(map(str, ts)) for ts in (usage.tlcm_timesteps(n), usage.comfy_timesteps(n)))
    return (f"A few-step LoRA for {src}, distilled data-free with TLCM (arXiv 2406.05768). Sample it with 2-"
            f"{usage.segments} steps and no classifier-free guidance (CFG 1.0; it is guidance-distilled). Each step "
            "predicts x0 and re-noises it with fresh noise to the next milestone timestep "
            f"({n} steps: {tlcm}). In ComfyUI: sampler {COMFY_SAMPLER[usage.sampler]}, scheduler {COMFY_SCHEDULER}, "
            f"which evaluates the model at " + ("the same timesteps." if tlcm == comfy else f"{comfy} instead."))


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """ModelSpec hash_sha256: SHA-256 of the file's tensor data (everything after the header), which the metadata
    does not change."""
    from safetensors.torch import save

    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    header = int.from_bytes(raw[:8], "little")
    return "0x" + hashlib.sha256(raw[8 + header:]).hexdigest()


def peft_config_for(lora: LoRAConfig, base: dict, family: str = "unet"):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=family_targets(lora, family), base_model_name_or_path=base.get("source"),
                      revision=base.get("revision"))


def to_peft(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict,
            family: str = "unet") -> tuple[dict, bytes]:
    """A PEFT adapter of the UNet (or transformer) as `PeftModel.save_pretrained` writes it (weights +
    adapter_config.json)."""
    tensors = {}
    for m, (a, b) in lora_modules(state).items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
    with tempfile.TemporaryDirectory() as d:
        peft_config_for(lora, base, family).save_pretrained(d)  # peft's own serialisation of the config
        config = (Path(d) / "adapter_config.json").read_bytes()
    return tensors, config


def scheduler_files(base_scheduler_config: dict, segments: int, sampler: str,
                    milestone_grid: str = "official") -> dict[str, bytes]:
    from .scheduler import TLCMScheduler

    sched = TLCMScheduler.from_base(base_scheduler_config, segments=segments, sampler=sampler,
                                    milestone_grid=milestone_grid)
    source = (Path(__file__).parent / "scheduler.py").read_bytes()
    return {SCHEDULER_CONFIG: sched.to_json_string().encode(), SCHEDULER_SOURCE: source}


def _safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI workflow

# the single-file checkpoints ComfyUI loads (models/checkpoints/) under the names their hub repositories ship
_CHECKPOINT_FILES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sd_xl_base_1.0.safetensors",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "v1-5-pruned-emaonly.safetensors",
    "runwayml/stable-diffusion-v1-5": "v1-5-pruned-emaonly.safetensors",
    "stabilityai/stable-diffusion-2-1": "v2-1_768-ema-pruned.safetensors",
    "stabilityai/stable-diffusion-2-1-base": "v2-1_512-ema-pruned.safetensors",
}


def comfy_checkpoint_name(source: str) -> str:
    """The base checkpoint file the workflow's CheckpointLoaderSimple names (the user edits it if theirs differs)."""
    known = _CHECKPOINT_FILES.get(source)
    if known:
        return known
    stem = source.rstrip("/").replace(":", "/").rsplit("/", 1)[-1] or "base"
    return f"{stem}.safetensors"


def comfy_workflow(base: dict, unet_config: dict, usage: Usage, prompt: str = "a photo of a cat",
                   lora_name: str = Path(KOHYA_FILE).name) -> dict:
    """A ComfyUI workflow in API format (node id -> class_type + inputs; a link is [node id, output index]).

    API format rather than the UI's LiteGraph format: it names every input, so it does not depend on widget order or
    canvas layout that change between ComfyUI versions; `POST /prompt` runs it as is, and the ComfyUI frontend opens
    it when dropped on the canvas (the editor lays the nodes out)."""
    fam = base_family(unet_config, usage.prediction_type)
    res = int(base.get("resolution") or fam.resolution)

    def node(class_type: str, title: str, **inputs) -> dict:
        return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}

    return {
        "1": node("CheckpointLoaderSimple", "Base checkpoint", ckpt_name=comfy_checkpoint_name(base.get("source", ""))),
        "2": node("LoraLoader", "TLCM LoRA", model=["1", 0], clip=["1", 1], lora_name=lora_name,
                  strength_model=1.0, strength_clip=1.0),
        "3": node("CLIPTextEncode", "Prompt", text=prompt, clip=["2", 1]),
        # ignored at cfg 1.0 (ComfyUI then skips the unconditional pass) but KSampler needs one
        "4": node("CLIPTextEncode", "Negative prompt (unused at cfg 1.0)", text="", clip=["2", 1]),
        "5": node("EmptyLatentImage", "Latent", width=res, height=res, batch_size=1),
        "6": node("KSampler", f"TLCM sampling ({usage.hint()})", model=["2", 0], positive=["3", 0],
                  negative=["4", 0], latent_image=["5", 0], seed=0, steps=usage.steps, cfg=1.0,
                  sampler_name=COMFY_SAMPLER[usage.sampler], scheduler=COMFY_SCHEDULER, denoise=1.0),
        "7": node("VAEDecode", "Decode", samples=["6", 0], vae=["1", 2]),
        "8": node("SaveImage", "Save", images=["7", 0], filename_prefix="tlcm"),
    }


def _comfy_card_section(base: dict, unet_config: dict, usage: Usage) -> list[str]:
    ckpt = comfy_checkpoint_name(base.get("source", ""))
    lines = ["## ComfyUI and A1111 / Forge", "",
             f"Put `{KOHYA_FILE}` in `ComfyUI/models/loras/` and the base checkpoint in `ComfyUI/models/checkpoints/` "
             f"(the workflow names it `{ckpt}`; change `ckpt_name` if yours differs), then drop `{COMFY_WORKFLOW}` "
             "(API format) on the ComfyUI canvas or `POST` it to `/prompt`. It loads the checkpoint "
             f"(CheckpointLoaderSimple), the LoRA (LoraLoader, strength 1.0) and samples with KSampler: steps "
             f"{usage.steps}, cfg 1.0, sampler `{COMFY_SAMPLER[usage.sampler]}`, scheduler `{COMFY_SCHEDULER}`, "
             "denoise 1.0. In A1111 / Forge: `<lora:tlcm_lora:1>`, sampler LCM, CFG scale 1, "
             f"{usage.steps} steps.", ""]
    if usage.sampler == "renoise":
        lines += ["ComfyUI's `lcm` sampler is TLCM's sampler: each step takes the model's x0 prediction and re-noises "
                  "it with fresh Gaussian noise to the next timestep, and the last step returns x0. What differs is "
                  f"where the model is evaluated. `{COMFY_SCHEDULER}` visits the timesteps "
                  f"T-1-floor(i*T/N) (T = {usage.num_train_timesteps}, i < N steps), TLCM its "
                  f"{usage.segments}-segment milestones:", ""]
    else:
        lines += ["ComfyUI's `euler` sampler on the base's sigmas is the deterministic DDIM jump of TLCM's multistep "
                  f"sampler. `{COMFY_SCHEDULER}` visits T-1-floor(i*T/N) (T = {usage.num_train_timesteps}), "
                  f"TLCM its {usage.segments}-segment milestones:", ""]
    lines += [f"| steps | TLCM timesteps | ComfyUI `{COMFY_SCHEDULER}` timesteps | difference |", "|---|---|---|---|"]
    for n in usage.step_counts():
        tlcm, comfy = usage.tlcm_timesteps(n), usage.comfy_timesteps(n)
        diff = [f"step {i + 1}: {c} instead of {t}" for i, (t, c) in enumerate(zip(tlcm, comfy)) if t != c]
        lines.append(f"| {n} | {', '.join(map(str, tlcm))} | {', '.join(map(str, comfy))} | "
                     f"{'; '.join(diff) or 'none'} |")
    lines += ["", "No ComfyUI scheduler gives TLCM's timesteps for every step count (`sgm_uniform` puts the noise "
              "levels between the table's timesteps, e.g. 999 and 499.5 for 2 steps; `normal` ends at timestep 0; "
              "`ddim_uniform` starts below 999); where they differ, the ComfyUI image is close to but not TLCM's. "
              "ComfyUI also draws its own noise, so a seed does not give the same image as diffusers with that seed.",
              ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Model card


def _pipeline_class(unet_config: dict) -> str:
    return "StableDiffusionXLPipeline" if unet_config.get("addition_embed_type") == "text_time" \
        else "StableDiffusionPipeline"


def _toy_path_call(src: str) -> str:
    """`toy_teacher_path(...)` for a shipped toy teacher's source ("toy", "toy:<world>", "toy:<world>/flow")."""
    kind = toy_teacher_kind(src)
    return f'toy_teacher_path("{toy_world(src)}"' + (f', "{kind}")' if kind != "unet" else ")")


def model_card(lora: LoRAConfig, base: dict, unet_config: dict, formats: list[str], segments: int, sampler: str,
               steps: int, training: dict | None = None, metrics: list[dict] | None = None,
               name: str = "TLCM LoRA", usage: Usage | None = None) -> str:
    from .evaluation import markdown_table

    usage = usage or Usage(steps=steps, segments=segments, sampler=sampler)
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
        f"guidance 0 (CFG 1.0 in ComfyUI / A1111), on the TLCM milestone timesteps ({segments} segments, "
        f"`{sampler}` sampler).", "",
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
        lines.append(f"| `{COMFY_WORKFLOW}` | a ComfyUI workflow (API format) with the LoRA and TLCM's sampling |")
    if "peft" in formats:
        lines.append(f"| `{PEFT_WEIGHTS}`, `{PEFT_CONFIG}` | PEFT `load_adapter`, as the official TLCM release |")
    lines += [f"| `{SCHEDULER_CONFIG}`, `{SCHEDULER_SOURCE}` | the TLCM scheduler (diffusers `SchedulerMixin`) |",
              "", "## Usage (diffusers)", "", "```python", "import sys", "", "import torch",
              f"from diffusers import {pipe_cls}", "",
              'sys.path.insert(0, "EXPORT_DIR/scheduler")  # scheduling_tlcm.py: torch + diffusers only',
              "from scheduling_tlcm import TLCMScheduler  # (or: from tlcm_core.scheduler import TLCMScheduler)", "",
              *(["from tlcm_core.toy import toy_teacher_path  # the toy world's teacher ships with tlcm", "",
                 f'pipe = {pipe_cls}.from_pretrained({_toy_path_call(src)})']
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
    if "kohya" in formats:
        lines += _comfy_card_section(base, unet_config, usage)
    lines += ["## Command line (this project)", "", "```", f"tlcm generate --lora EXPORT_DIR --steps {steps} "
              f'--seed 0 --prompt "{example}" --out image.png', "```", ""]
    if metrics:
        lines += ["## Metrics", "", markdown_table(metrics), ""]
    if training:
        lines += ["## Training", "", "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1 and SD3: the transformer's LoRA in the same formats (the original layer names for kohya/ComfyUI)

FLOW_PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
FLOW_NAMES = {"flux": "FLUX.1", "sd3": "SD3"}


def export_family(metadata: dict[str, str], net_config: dict, where: str = "LoRA") -> str:
    """The family of the exported LoRA: its metadata's `family`, else the base network config's class (a LoRA
    written before the families records none), else unet. A LoRA recorded for another family is refused."""
    cls = net_config.get("_class_name")
    by_config = next((f.name for f in FAMILIES.values() if cls in f.network_classes), None)
    recorded = metadata.get("family")
    if recorded is not None and by_config is not None and recorded != by_config:
        raise ExportError(f"{where} is a LoRA of a {recorded} network, but the base model's network is a {cls} "
                          f"({by_config})")
    return recorded or by_config or "unet"


def flow_kohya_metadata(lora: LoRAConfig, base: dict, family: str, net_config: dict, usage: Usage) -> dict[str, str]:
    """kohya-ss and ModelSpec metadata of a FLUX.1 / SD3 kohya file (sd-scripts' networks.lora_flux / lora_sd3
    values). The scale alpha/rank is folded into lora_up, so the nominal alpha is the rank."""
    src, res = base.get("source", "?"), base.get("resolution") or 1024
    if family == "flux":
        arch = "flux-1-dev" if net_config.get("guidance_embeds") else "flux-1-schnell"
        module, version = "networks.lora_flux", "flux1"
    else:
        arch, module, version = "stable-diffusion-3", "networks.lora_sd3", "sd3"
    return {
        "ss_network_module": module, "ss_network_dim": str(lora.rank), "ss_network_alpha": repr(float(lora.rank)),
        "ss_network_args": "{}", "ss_base_model_version": version, "ss_sd_model_name": src,
        "ss_output_name": Path(KOHYA_FILE).stem,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": IMPLEMENTATION[family],
        "modelspec.title": f"TLCM {usage.segments}-segment LoRA (rank {lora.rank}) for {src}",
        "modelspec.description": _flow_description(src, family, usage),
        "modelspec.usage_hint": _flow_hint(usage), "modelspec.resolution": f"{res}x{res}",
        "modelspec.tags": f"tlcm, few-step, lcm, distillation, {family}",
        "tlcm_lora_config": json.dumps(lora.model_dump(mode="json")),
        "tlcm_base_model": json.dumps(base, sort_keys=True),
        "tlcm_family": family, "tlcm_folded_scale": repr(lora.alpha / lora.rank),
        "tlcm_sampling": json.dumps({"steps": usage.steps, "segments": usage.segments, "sampler": usage.sampler,
                                     "timesteps": {str(n): usage.tlcm_timesteps(n) for n in usage.step_counts()}}),
    }


def _flow_hint(usage: Usage) -> str:
    return (f"{usage.steps} steps (2-{usage.segments}), guidance_scale 1 (no CFG), FlowMatchTLCMScheduler "
            "(the TLCM milestones), LoRA strength 1.0")


def _flow_description(src: str, family: str, usage: Usage) -> str:
    n = usage.steps if usage.steps <= usage.segments else usage.step_counts()[-1]
    return (f"A few-step LoRA for {src} ({FLOW_NAMES[family]}), distilled data-free with TLCM (arXiv 2406.05768). "
            f"Sample it with 2-{usage.segments} steps at guidance_scale 1 (no classifier-free guidance; it is "
            "guidance-distilled). Each step predicts x0 and re-noises it to the next milestone's sigma "
            f"({n} steps: indices {', '.join(map(str, usage.tlcm_timesteps(n)))} of 1000, at the base model's shifted "
            "sigmas); diffusers: FlowMatchTLCMScheduler, shipped with the LoRA.")


def to_kohya_flow(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict, family: str, net_config: dict,
                  usage: Usage) -> tuple[dict, dict[str, str]]:
    """kohya/ComfyUI file of a FLUX.1 / SD3 LoRA: `lora_unet_<original layer name>` (tlcm_core/flow_lora_names.py;
    q/k/v and FLUX's single-block MLP input fused), the scale folded into lora_up and every `.alpha` its module's
    rank, so ComfyUI (alpha / rank = 1) and diffusers' kohya converter (which ignores the final layer's alpha) apply
    the same weights."""
    scale = lora.alpha / lora.rank
    modules = {m: (a, _folded(b, scale)) for m, (a, b) in lora_modules(state).items()}
    try:
        layers = kohya_layers(family, modules, net_config)
    except ValueError as e:
        raise ExportError(f"kohya export: {e}") from None
    out = {}
    for name, (down, up) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    meta = flow_kohya_metadata(lora, base, family, net_config, usage)
    meta["modelspec.hash_sha256"] = _tensor_hash(out)
    return out, meta


def flow_scheduler_files(base_scheduler_config: dict, segments: int, sampler: str,
                         milestone_grid: str = "official") -> dict[str, bytes]:
    from .flow_scheduler import FlowMatchTLCMScheduler

    try:
        sched = FlowMatchTLCMScheduler.from_base(base_scheduler_config, segments=segments, sampler=sampler,
                                                 milestone_grid=milestone_grid)
    except ValueError as e:
        raise ExportError(f"export: {e}") from None
    source = (Path(__file__).parent / "flow_scheduler.py").read_bytes()
    return {SCHEDULER_CONFIG: sched.to_json_string().encode(), FLOW_SCHEDULER_SOURCE: source}


def flow_export_files(state: dict[str, torch.Tensor], lora: LoRAConfig, base: dict, family: str, formats: list[str],
                      net_config: dict, scheduler_config: dict, usage: Usage, *, kohya_naming: str = "auto",
                      training: dict | None = None, metrics: list[dict] | None = None) -> dict[str, bytes]:
    """export_files for a FLUX.1 / SD3 LoRA: diffusers, kohya (original names) and PEFT files, the flow scheduler
    and the model card; no ComfyUI workflow (its samplers are not matched to TLCM's flow milestones yet)."""
    if "kohya" in formats and kohya_naming != "auto":
        raise ExportError(f"export.kohya_naming={kohya_naming} names SD/SDXL UNet modules; a {FLOW_NAMES[family]} "
                          "kohya file uses the original layer names (set export.kohya_naming=auto)")
    files: dict[str, bytes] = {}
    if "diffusers" in formats:
        files[DIFFUSERS_FILE] = _safetensors_bytes(*to_diffusers(state, lora, base, family))
    if "kohya" in formats:
        files[KOHYA_FILE] = _safetensors_bytes(*to_kohya_flow(state, lora, base, family, net_config, usage))
    if "peft" in formats:
        tensors, config = to_peft(state, lora, base, family)
        files[PEFT_WEIGHTS] = _safetensors_bytes(tensors, {"format": "pt"})
        files[PEFT_CONFIG] = config
    files.update(flow_scheduler_files(scheduler_config, usage.segments, usage.sampler, usage.milestone_grid))
    files[MODEL_CARD] = flow_model_card(lora, base, family, net_config, formats, usage, training, metrics).encode()
    return files


def flow_model_card(lora: LoRAConfig, base: dict, family: str, net_config: dict, formats: list[str], usage: Usage,
                    training: dict | None = None, metrics: list[dict] | None = None, name: str = "TLCM LoRA") -> str:
    from .evaluation import markdown_table

    src = base.get("source", "?")
    guidance = ("the student was distilled with FLUX.1-dev's guidance embedding at 1.0, so `guidance_scale=1`"
                if family == "flux" and net_config.get("guidance_embeds") else
                "`guidance_scale=1` (no classifier-free guidance batch)")
    lines = [
        "---", "library_name: diffusers", f"base_model: {src}", "tags:", "- text-to-image", "- lora", "- tlcm",
        "- few-step", f"- {family}", "---", "", f"# {name}", "",
        f"A few-step LoRA for `{src}` ({FLOW_NAMES[family]}, rectified flow) distilled with TLCM (Xie et al., "
        "*TLCM: Training-efficient Latent Consistency Model for Image Generation with 2-8 Steps*, arXiv "
        f"2406.05768), data-free. Sample it with 2-{usage.segments} steps and no CFG: {guidance}. The steps are the "
        f"TLCM milestones ({usage.segments} segments, `{usage.sampler}` sampler) at the base model's shifted sigmas, "
        "which `FlowMatchTLCMScheduler` visits" + (
            ": the N of them nearest to evenly spaced sigmas (`milestone_grid=\"sigma\"`), " + "; ".join(
                f"{n} steps: {', '.join(map(str, usage.tlcm_timesteps(n)))}" for n in usage.step_counts())
            if usage.milestone_grid == "sigma" else "") + ".", "",
        "## LoRA", "", f"- base model: `{json.dumps(base, sort_keys=True)}`",
        f"- rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.alpha / lora.rank:g}), the transformer only",
        f"- target modules: {', '.join(f'`{t}`' for t in family_targets(lora, family))}", "",
        "## Files", "", "| file | for |", "|---|---|",
    ]
    if "diffusers" in formats:
        lines.append(f"| `{DIFFUSERS_FILE}` | diffusers `load_lora_weights` (`transformer.*` keys, alpha/rank folded "
                     "into lora_B) |")
    if "kohya" in formats:
        names = "Black Forest Labs' FLUX" if family == "flux" else "Stability's MMDiT"
        lines.append(f"| `{KOHYA_FILE}` | ComfyUI, Forge, kohya-ss: `lora_unet_*` keys under {names} layer names, "
                     "q/k/v fused as there |")
    if "peft" in formats:
        lines.append(f"| `{PEFT_WEIGHTS}`, `{PEFT_CONFIG}` | PEFT `PeftModel.from_pretrained(transformer, ...)` |")
    lines += [f"| `{SCHEDULER_CONFIG}`, `{FLOW_SCHEDULER_SOURCE}` | `FlowMatchTLCMScheduler` (diffusers "
              "`SchedulerMixin`; torch + diffusers only) |", ""]
    lines += _flow_usage(lora, base, family, formats, usage)
    if metrics:
        lines += ["## Metrics", "", markdown_table(metrics), ""]
    if training:
        lines += ["## Training", "", "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def _flow_usage(lora: LoRAConfig, base: dict, family: str, formats: list[str], usage: Usage) -> list[str]:
    """The model card's usage sections of a FLUX.1 / SD3 LoRA: diffusers, PEFT, kohya/ComfyUI, the CLI."""
    src, res, msl = base.get("source", "?"), base.get("resolution"), base.get("max_sequence_length")
    pipe_cls = FLOW_PIPELINES[family]
    extra = (f", height={res}, width={res}" if res else "") + (f", max_sequence_length={msl}" if msl else "")
    lines = ["## Usage (diffusers)", "", "```python", "import sys", "", "import torch",
             f"from diffusers import {pipe_cls}", "",
             'sys.path.insert(0, "EXPORT_DIR/scheduler")  # scheduling_flow_tlcm.py: torch + diffusers only',
             "from scheduling_flow_tlcm import FlowMatchTLCMScheduler  # (or: from tlcm_core.flow_scheduler import "
             "FlowMatchTLCMScheduler)", "",
             *(["from tlcm_core.toy import toy_teacher_path  # the toy world's teacher ships with tlcm", "",
                f'pipe = {pipe_cls}.from_pretrained({_toy_path_call(src)})'] if toy_world(src) else
               [f'pipe = {pipe_cls}.from_pretrained("{src}", torch_dtype=torch.bfloat16)']),
             'pipe.scheduler = FlowMatchTLCMScheduler.from_pretrained("EXPORT_DIR", subfolder="scheduler")']
    if "diffusers" in formats:
        lines.append('pipe.load_lora_weights("EXPORT_DIR/diffusers", adapter_name="tlcm")')
    lines += ["g = torch.Generator().manual_seed(0)",
              "pipe.scheduler.set_noise_generator(g)  # the pipeline passes no generator to the scheduler's steps",
              f'image = pipe("{"a red circle" if toy_world(src) else "a photo of a cat"}", '
              f'num_inference_steps={usage.steps}, guidance_scale=1.0{extra},',
              "             generator=g).images[0]", "```", ""]
    if "peft" in formats:
        lines += ["## Usage (PEFT)", "", "```python", "from peft import PeftModel", "",
                  'pipe.transformer = PeftModel.from_pretrained(pipe.transformer,',
                  '                                             "EXPORT_DIR/peft").merge_and_unload()',
                  "```", ""]
    if "kohya" in formats:
        lines += _flow_kohya_section(family)
    lines += ["## Command line (this project)", "", "```", f"tlcm generate --lora EXPORT_DIR --steps {usage.steps} "
              '--seed 0 --prompt "a photo of a cat" --out image.png', "```", ""]
    return lines


def _flow_kohya_section(family: str) -> list[str]:
    if family == "flux":
        names = ("Black Forest Labs' FLUX code names them (`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`, "
                 "`final_layer.linear`, ...), the names ComfyUI's FLUX model and kohya-ss' `networks.lora_flux` use")
    else:
        names = ("Stability's MMDiT names them (`joint_blocks.0.x_block.attn.qkv`, `final_layer.linear`, ...), the "
                 "names ComfyUI's SD3 model and kohya-ss' `networks.lora_sd3` use")
    return ["## ComfyUI, Forge, kohya-ss", "",
            f"`{KOHYA_FILE}` holds the transformer's LoRA under the layer names {names}; LoRAs of q, k and v (and, in "
            "FLUX's single blocks, of the MLP input) are combined into one LoRA of the fused layer. In ComfyUI put it "
            "in `models/loras/` and load it with `LoraLoaderModelOnly` (strength 1.0) on the base model. No ComfyUI "
            "workflow ships with it: ComfyUI's samplers and schedulers have not been matched to TLCM's milestone "
            "sigmas for flow models, so sample with diffusers and the shipped scheduler for TLCM's own sampling. "
            "diffusers loads the diffusers file; its kohya converter reads this file too but (diffusers 0.42) drops "
            "the embedder and final-layer modules and needs the full-size model's widths.", ""]


# ---------------------------------------------------------------------------------------------------------------------
# Everything at once


def export_files(state: dict[str, torch.Tensor], metadata: dict[str, str], formats: list[str], unet_config: dict,
                 scheduler_config: dict, *, segments: int, sampler: str = "renoise", steps: int = 4,
                 milestone_grid: str = "official", kohya_naming: str = "auto", training: dict | None = None,
                 metrics: list[dict] | None = None, where: str = "LoRA") -> dict[str, bytes]:
    """Relative path -> bytes for every exported file of a TLCM LoRA (state + tlcm-lora/1 metadata). `unet_config`
    is the base's denoising network's config: its UNet's, or its transformer's for FLUX.1 / SD3 (base_configs)."""
    lora = check_lora(state, metadata, where=where)
    base = json.loads(metadata.get("base_model", "{}"))
    unknown = [f for f in formats if f not in ("diffusers", "kohya", "peft")]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; use diffusers, kohya, peft")
    family = export_family(metadata, unet_config, where)
    schedule = None
    if milestone_grid == "sigma":  # the base's noise levels at its resolution (FLUX's shift depends on it; VAE 8x)
        fam = FAMILIES[family]
        seq = fam.image_seq_len(int(base.get("resolution") or 1024), 8, unet_config)
        schedule = fam.schedule(scheduler_config, seq)
    usage = usage_for(scheduler_config, segments=segments, sampler=sampler, steps=steps,
                      milestone_grid=milestone_grid, schedule=schedule)
    if family != "unet":
        return flow_export_files(state, lora, base, family, formats, unet_config, scheduler_config, usage,
                                 kohya_naming=kohya_naming, training=training, metrics=metrics)
    files: dict[str, bytes] = {}
    if "diffusers" in formats:
        files[DIFFUSERS_FILE] = _safetensors_bytes(*to_diffusers(state, lora, base))
    if "kohya" in formats:
        files[KOHYA_FILE] = _safetensors_bytes(*to_kohya(state, lora, base, unet_config, kohya_naming, usage))
        prompt = "a red circle" if toy_world(base.get("source", "")) else "a photo of a cat"
        workflow = comfy_workflow(base, unet_config, usage, prompt)
        files[COMFY_WORKFLOW] = (json.dumps(workflow, indent=2) + "\n").encode()
    if "peft" in formats:
        tensors, config = to_peft(state, lora, base)
        files[PEFT_WEIGHTS] = _safetensors_bytes(tensors, {"format": "pt"})
        files[PEFT_CONFIG] = config
    files.update(scheduler_files(scheduler_config, segments, sampler, usage.milestone_grid))
    files[MODEL_CARD] = model_card(lora, base, unet_config, formats, segments, sampler, steps, training,
                                   metrics, usage=usage).encode()
    return files


def base_configs(teacher: TeacherConfig) -> tuple[dict, dict]:
    """The base model's denoising network's and scheduler's configs (config files only; no weights are loaded): the
    UNet's for SD/SDXL, the transformer's for FLUX.1 / SD3 (its `_class_name` tells export_files the family)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from .models import network_config, resolve_teacher_source, teacher_family

    family = teacher_family(teacher)
    src = resolve_teacher_source(teacher)
    if family.name != "unet":
        sched = FlowMatchEulerDiscreteScheduler.load_config(src, subfolder="scheduler", revision=teacher.revision)
        return network_config(teacher, family), dict(sched)
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


__all__ = ["BaseFamily", "ExportError", "Usage", "base_family", "comfy_simple_timesteps", "comfy_workflow",
           "export_family", "export_files", "flow_export_files", "flow_model_card", "kohya_metadata", "lora_modules",
           "model_card", "sgm_module_path", "to_diffusers", "to_kohya", "to_kohya_flow", "to_peft", "usage_for",
           "write_files"]
