"""LoRA attachment and (de)serialization -- kept in one place (STYLE.md 6).

Inside the pipeline a TLCM LoRA is a safetensors file of PEFT tensors under a `unet.` prefix
(`unet.<module>.lora_A.weight` / `lora_B.weight`, every module named alike) whose metadata records the LoRA
config (rank and alpha) and the base model identity, so a LoRA of the wrong rank or for another base is refused
before any work. For other programs, the `export` stage writes the diffusers, kohya/ComfyUI and PEFT layouts
(tlcm_core/export.py), with alpha folded in where the consumer assumes alpha = rank.
"""

from __future__ import annotations

import json

import torch

from .config import LoRAConfig

ADAPTER = "tlcm"


class LoRAError(ValueError):
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
