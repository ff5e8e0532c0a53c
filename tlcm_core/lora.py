"""LoRA attachment and (de)serialization -- kept in one place (docs/conventions.md).

Inside the pipeline a TLCM LoRA is a safetensors file of PEFT tensors under a `unet.` prefix
(`unet.<module>.lora_A.weight` / `lora_B.weight`, every module named alike) whose metadata records the LoRA
config (rank and alpha) and the base model identity, so a LoRA of the wrong rank or for another base is refused
before any work. For other programs, the `export` stage writes the diffusers, kohya/ComfyUI and PEFT layouts
(tlcm_core/export.py), with alpha folded in where the consumer assumes alpha = rank.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .config import LoRAConfig
from .errors import UserError

ADAPTER = "tlcm"


class LoRAError(UserError, ValueError):
    pass


def _present_targets(unet: torch.nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, _ in unet.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def attach_lora(unet: torch.nn.Module, lora: LoRAConfig, adapter_name: str = ADAPTER) -> None:
    """Add a trainable LoRA adapter to the UNet (PEFT), initialised to zero so the student starts as the teacher."""
    from peft import LoraConfig

    targets = _present_targets(unet, lora.target_modules)
    if not targets:
        raise LoRAError(f"none of lora.target_modules={lora.target_modules} exist in this UNet")
    unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                init_lora_weights=True, target_modules=targets), adapter_name=adapter_name)
    unet.set_adapter(adapter_name)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's PEFT tensors under a `unet.` prefix (lora_A/lora_B for every module; see the module doc)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}


def lora_metadata(lora: LoRAConfig, base: dict) -> dict[str, str]:
    return {"format": "tlcm-lora/1", "lora_config": json.dumps(lora.model_dump(mode="json")),
            "base_model": json.dumps(base, sort_keys=True)}


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
    """Attach an adapter with `lora`'s shape and load weights saved by `lora_state_dict`; every key must match."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if adapter_name not in getattr(unet, "peft_config", {}):
        attach_lora(unet, lora, adapter_name)
    sd = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    peft_sd = convert_unet_state_dict_to_peft(sd)
    result = set_peft_model_state_dict(unet, peft_sd, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = {n for n, _ in unet.named_parameters() if f"lora_" in n and f".{adapter_name}." in n}
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
    segments = sampler = None
    if not ref.endswith(".safetensors"):
        manifest = _read(f"{root}/manifest.json")
        sched = _read(f"{root}/scheduler/scheduler_config.json")
        if sched is not None:
            sc = json.loads(sched)
            segments, sampler = sc.get("segments"), sc.get("sampler")
        elif manifest is not None:
            segments = json.loads(manifest).get("config", {}).get("schedule", {}).get("segments")
    return LoRAFile(state, metadata, url, config, base, segments, sampler)
