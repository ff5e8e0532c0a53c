"""LoRA attachment and (de)serialization -- kept in one place (docs/conventions.md).

Inside the pipeline a TLCM LoRA is a safetensors file of PEFT tensors under the prefix of the network it adapts,
the teacher family's `network_part` (`unet.<module>.lora_A.weight` / `lora_B.weight` for SD/SDXL,
`transformer.<module>...` for FLUX.1 and SD3; every module named alike), whose metadata records the LoRA config
(rank, alpha, the target modules as resolved) and the base model identity, so a LoRA of the wrong rank or for
another base is refused before any work; a LoRA of a flow teacher also records its family (`family`; absent means
`unet`, as in every file written before the families). `lora.target_modules: auto` is the family's list
(`ModelFamily.lora_target_modules`). For other programs, the `export` stage writes the diffusers, kohya/ComfyUI and
PEFT layouts (tlcm_core/lora_files.py), with alpha folded in where the consumer assumes alpha = rank.
"""

from __future__ import annotations

import json
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LoRAConfig
from .errors import UserError
from .families import FAMILIES, ModelFamily, family_of

ADAPTER = "tlcm"
# the key prefixes of a TLCM LoRA file: the network part of its family (unet: SD/SDXL; transformer: FLUX.1, SD3)
KEY_PREFIXES = tuple(sorted({f.network_part + "." for f in FAMILIES.values()}))


class LoRAError(UserError, ValueError):
    pass


def family_targets(lora: LoRAConfig, family: ModelFamily | str) -> list[str]:
    """The target modules `lora` asks for on a network of `family`: its explicit list, or (auto) the family's."""
    family = FAMILIES[family] if isinstance(family, str) else family
    return list(family.lora_target_modules) if lora.target_modules == "auto" else list(lora.target_modules)


def resolved_lora(lora: LoRAConfig, family: ModelFamily | str) -> LoRAConfig:
    """`lora` with `target_modules: auto` replaced by the family's list (what a LoRA file's metadata records)."""
    return lora if lora.target_modules != "auto" else lora.model_copy(
        update={"target_modules": family_targets(lora, family)})


def _present_targets(net: torch.nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, _ in net.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def _within_block(name: str) -> str:
    """A module's name inside its repeated block (after the last index followed by two or more parts):
    down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj -> ff.net.0.proj; x_embedder -> x_embedder."""
    parts = name.split(".")
    cut = max((i + 1 for i, p in enumerate(parts) if p.isdigit() and len(parts) - i > 2), default=0)
    return ".".join(parts[cut:])


def adaptable_modules(net: torch.nn.Module) -> str:
    """The network's linear and convolution layers as target-module suffixes, for error messages."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return ", ".join(sorted({_within_block(n) for n, m in net.named_modules() if isinstance(m, kinds)}))


def lora_targets(net: torch.nn.Module, lora: LoRAConfig) -> list[str]:
    """The targets `attach_lora` adapts on `net`: those of `family_targets` present in it (PEFT suffix matching).
    None present: one LoRAError naming the family, the network's layers and the family's default list."""
    family = family_of(net)
    wanted = family_targets(lora, family)
    targets = _present_targets(net, wanted)
    if not targets:
        raise LoRAError(f"lora.target_modules={wanted} match no module of the {family.name} teacher's "
                        f"{type(net).__name__}, whose layers are {adaptable_modules(net)}; name some of those, or set "
                        f"lora.target_modules=auto ({family.name}: {list(family.lora_target_modules)})")
    return targets


def check_lora_targets(teacher, lora: LoRAConfig) -> None:
    """Before any stage runs: an explicit `lora.target_modules` must match some module of the teacher's network,
    built without weights from its config. Only where the teacher's files are local (a toy teacher, a folder); a hub
    teacher's list is checked when its network loads, before the first training step."""
    from accelerate import init_empty_weights

    from .models import local_family, network_config, resolve_teacher_source

    family = local_family(teacher) if lora.target_modules != "auto" else None
    folder = teacher.toy_world is not None or Path(teacher.source.removeprefix("file://")).is_dir()
    if family is None or not folder:  # `auto`, or a hub id / remote URL (nothing fetched here)
        return
    if not (Path(resolve_teacher_source(teacher)) / family.network_part / "config.json").is_file():
        return  # not a diffusers folder: check_teacher says so when the teacher loads
    with init_empty_weights():
        net = family.network_loader().from_config(network_config(teacher, family))
    lora_targets(net, lora)


def attach_lora(unet: torch.nn.Module, lora: LoRAConfig, adapter_name: str = ADAPTER) -> None:
    """Add a trainable LoRA adapter to the teacher's network (its UNet or transformer; PEFT), initialised to zero so
    the student starts as the teacher."""
    from peft import LoraConfig

    targets = lora_targets(unet, lora)
    unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                init_lora_weights=True, target_modules=targets), adapter_name=adapter_name)
    unet.set_adapter(adapter_name)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's PEFT tensors under the network's prefix, `unet.` or `transformer.` (lora_A/lora_B for every
    module; see the module doc)."""
    from peft.utils import get_peft_model_state_dict

    prefix = family_of(unet).network_part
    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}


def lora_metadata(lora: LoRAConfig, base: dict, family: ModelFamily | str = "unet") -> dict[str, str]:
    """A TLCM LoRA file's metadata: the config with its targets resolved for `family`, the base model identity and,
    for a flow family, the family (a UNet LoRA's metadata is what it was before the families, byte for byte)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    meta = {"format": "tlcm-lora/1", "lora_config": json.dumps(resolved_lora(lora, family).model_dump(mode="json")),
            "base_model": json.dumps(base, sort_keys=True)}
    if family.name != "unet":
        meta["family"] = family.name
    return meta


def lora_family(metadata: dict[str, str]) -> str:
    """The family a TLCM LoRA file was trained for (metadata `family`; absent: unet)."""
    return metadata.get("family", "unet")


def split_prefix(state: dict[str, torch.Tensor], where: str = "LoRA") -> tuple[str, dict[str, torch.Tensor]]:
    """(prefix, tensors without it): every key of a TLCM LoRA starts with one of KEY_PREFIXES, the same one."""
    prefixes = {next((p for p in KEY_PREFIXES if k.startswith(p)), None) for k in state}
    if len(prefixes) != 1 or None in prefixes:
        odd = next((k for k in state if not k.startswith(KEY_PREFIXES)), None)
        raise LoRAError(f"{where}: a TLCM LoRA's keys all start with one of {', '.join(KEY_PREFIXES)}; "
                        + (f"found {odd!r}" if odd else f"found {sorted(p for p in prefixes if p)}"))
    prefix = prefixes.pop()
    return prefix, {k[len(prefix):]: v for k, v in state.items()}


def check_lora(state: dict[str, torch.Tensor], metadata: dict[str, str], lora: LoRAConfig | None = None,
               base: dict | None = None, where: str = "LoRA") -> LoRAConfig:
    """Refuse a LoRA that is not ours, has another rank, or was trained on another base model."""
    if metadata.get("format") != "tlcm-lora/1" or "lora_config" not in metadata:
        raise LoRAError(f"{where}: not a TLCM LoRA (no tlcm-lora/1 metadata)")
    saved = LoRAConfig.model_validate(json.loads(metadata["lora_config"]))
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k or "lora.down" in k}
    if ranks and ranks != {saved.rank}:
        raise LoRAError(f"{where}: tensors have rank(s) {sorted(ranks)} but the metadata says {saved.rank}")
    if lora is not None and saved.rank != lora.rank:
        raise LoRAError(f"{where}: rank {saved.rank} does not match lora.rank={lora.rank}; set lora.rank={saved.rank}")
    if base is not None and "base_model" in metadata:
        saved_base = json.loads(metadata["base_model"])
        if saved_base != base:
            raise LoRAError(f"{where}: trained on base model {saved_base}, not on the configured teacher {base}")
    return saved


def load_lora_into(unet: torch.nn.Module, state: dict[str, torch.Tensor], lora: LoRAConfig,
                   adapter_name: str = ADAPTER) -> None:
    """Attach an adapter with `lora`'s shape and load weights saved by `lora_state_dict`; every key must match.
    The keys' prefix must be the network's (`unet.` for a UNet, as every file written before the families)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    prefix, sd = split_prefix(state)
    network = family_of(unet)
    if prefix != network.network_part + ".":
        raise LoRAError(f"LoRA keys start with {prefix!r}: a LoRA of another kind of network than this "
                        f"{type(unet).__name__} ({network.name}, keys {network.network_part}.*)")
    if adapter_name not in getattr(unet, "peft_config", {}):
        attach_lora(unet, lora, adapter_name)
    peft_sd = convert_unet_state_dict_to_peft(sd)
    result = set_peft_model_state_dict(unet, peft_sd, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = {n for n, _ in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n}
    if unexpected:
        raise LoRAError(f"LoRA has {len(unexpected)} keys this UNet lacks, e.g. {unexpected[:3]}")
    loaded = len(peft_sd)
    if loaded != len(expected):
        raise LoRAError(f"LoRA has {loaded} tensors but the UNet's adapter has {len(expected)}: wrong base model or "
                        "target modules")
    unet.set_adapter(adapter_name)


def merge_lora(unet: torch.nn.Module, adapter_name: str = ADAPTER) -> int:
    """Fold the adapter into the base weights (W += B A * alpha / r) for sampling: every LoRA-wrapped layer then
    costs one matmul instead of three. The adapter stays attached but merged; training such a UNet again needs
    `unmerge_lora` first. Returns the number of layers merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer) and adapter_name in m.lora_A and adapter_name not in m.merged_adapters:
            m.merge(adapter_names=[adapter_name])
            n += 1
    return n


def unmerge_lora(unet: torch.nn.Module) -> None:
    """Undo `merge_lora` (restores the base weights up to float rounding)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in unet.modules():
        if isinstance(m, BaseTunerLayer) and m.merged:
            m.unmerge()


LORA_FORWARDS = ("separate", "merged")


def _merged_forward(layer, x, *args, **kwargs):
    """A LoRA layer's forward as one op on the adapted weight, W + sum of the active adapters' B A * alpha / r
    (differentiable in A and B), where PEFT runs the base op and then A and B on the input. The same function up to
    float rounding; PEFT's own forward wherever it differs (adapters off or merged, dropout, a LoRA variant such as
    DoRA, a per-sample adapter mix, mixed dtypes) and under autocast (GPU training), where the op would cast the
    full-size W + B A alpha/r to half precision on every call and round away the low bits of a delta small against W
    (SDXL's alpha/r = 1/8); PEFT keeps the delta's own output. With weights already in bfloat16 (the CPU sampling
    stages) both forms are as far from float32 on toy-hard's LoRA (0.091 merged, 0.095 PEFT's, of the LoRA's effect
    on the output; bench/bench_lora_forward.py --precision). Bound to the layer as a method, so a deep copy binds its
    copy."""
    import torch.nn.functional as F

    base = layer.base_layer
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if (args or kwargs or layer.disable_adapters or layer.merged or not active or x.dtype != base.weight.dtype
            or torch.is_autocast_enabled(x.device.type)
            or any(a in layer.lora_variant or not isinstance(layer.lora_dropout[a], torch.nn.Identity)
                   or layer.lora_A[a].weight.dtype != base.weight.dtype for a in active)):
        return type(layer).forward(layer, x, *args, **kwargs)
    w = base.weight
    for a in active:
        w = w + layer.get_delta_weight(a)
    if isinstance(base, torch.nn.Linear):
        return F.linear(x, w, base.bias)
    return base._conv_forward(x, w, base.bias)


def set_lora_forward(net: torch.nn.Module, mode: str) -> int:
    """How the network's LoRA layers (Linear and Conv2d) compute (compute.lora_forward): "separate" is PEFT's (the
    base op, then the rank-r A and B ops on the input); "merged" runs one op on W + B A * alpha / r. Merged saves
    the A and B ops at the cost of the adapted weight's full-size gradient: toy-hard's MLCD 1.7x as fast on a CPU
    (rank 64 on 32-96 channels), an SDXL-shaped layer at rank 64 1.7-3.3x slower and its conv keeping up to 6.5x the
    bytes for the backward pass (bench/bench_lora_forward.py). A set layer reads its active adapters at each call,
    so a second adapter on it is covered; layers wrapped later need another call. Returns the number of layers set."""
    if mode not in LORA_FORWARDS:
        raise ValueError(f"lora forward {mode!r}; allowed: {', '.join(LORA_FORWARDS)}")
    from peft.tuners.lora import layer as peft_lora

    n = 0
    for m in net.modules():
        if isinstance(m, (peft_lora.Linear, peft_lora.Conv2d)) and type(m.base_layer) in (torch.nn.Linear,
                                                                                              torch.nn.Conv2d):
            if mode == "merged":
                m.forward = types.MethodType(_merged_forward, m)
            else:
                m.__dict__.pop("forward", None)
            n += 1
    return n


@contextmanager
def adapters_disabled(unet):
    """The teacher is the student's UNet with its LoRA switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextmanager
def active_adapter(unet, name: str):
    unet.set_adapter(name)
    try:
        yield
    finally:
        unet.set_adapter(ADAPTER)


@dataclass
class LoRAFile:
    """A TLCM LoRA read from disk/object storage, with what its metadata and surroundings say."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    url: str
    config: LoRAConfig
    base: dict  # teacher_identity of the base model it was trained on
    segments: int | None = None  # from the stage manifest or an exported scheduler config, when next to the file
    sampler: str | None = None
    milestone_grid: str | None = None

    @property
    def family(self) -> str:
        return lora_family(self.metadata)


def _read(url: str) -> bytes | None:
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def read_lora(ref: Any, lora: LoRAConfig | None = None, base: dict | None = None) -> LoRAFile:
    """The one way to read a TLCM LoRA: `ref` is a training-stage artifact (a store Artifact, as stages get their
    inputs), or a string: a .safetensors path/URL, a training artifact's folder/URI (lora.safetensors) or an export
    folder (diffusers/pytorch_lora_weights.safetensors). With `lora` / `base` it is also checked against the
    configured rank and base model (teacher_identity), so a wrong LoRA is refused before any work."""
    if not isinstance(ref, str):  # an Artifact: read through its store (credentials, retries, checksums)
        state = ref.load_tensors("lora.safetensors")
        metadata = ref.tensors_metadata("lora.safetensors")
        config = check_lora(state, metadata, lora, base, where=ref.uri)
        return LoRAFile(state, metadata, ref.uri, config, json.loads(metadata.get("base_model", "{}")))
    found = _read_file(ref)
    if lora is not None or base is not None:
        check_lora(found.state, found.metadata, lora, base, where=found.url)
    return found


def _read_file(ref: str) -> LoRAFile:
    from safetensors.torch import load

    root = ref.rstrip("/")
    candidates = [ref] if ref.endswith(".safetensors") else [f"{root}/lora.safetensors",
                                                              f"{root}/diffusers/pytorch_lora_weights.safetensors"]
    for url in candidates:
        raw = _read(url)
        if raw is not None:
            break
    else:
        raise LoRAError(f"no TLCM LoRA at {ref} (looked for {', '.join(candidates)})")
    try:
        state = load(raw)
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    except Exception as e:
        raise LoRAError(f"{url} is not a readable safetensors file ({e})") from None
    metadata = dict(header.get("__metadata__") or {})
    config = check_lora(state, metadata, where=url)
    base = json.loads(metadata.get("base_model", "{}"))
    segments = sampler = grid = None
    if not ref.endswith(".safetensors"):
        manifest = _read(f"{root}/manifest.json")
        sched = _read(f"{root}/scheduler/scheduler_config.json")
        if sched is not None:
            sc = json.loads(sched)
            segments, sampler, grid = sc.get("segments"), sc.get("sampler"), sc.get("milestone_grid")
        elif manifest is not None:
            segments = json.loads(manifest).get("config", {}).get("schedule", {}).get("segments")
    return LoRAFile(state, metadata, url, config, base, segments, sampler, grid)
