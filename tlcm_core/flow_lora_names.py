"""The original module names of FLUX.1 and SD3 transformers, as kohya-style LoRA files use them.

diffusers names a FLUX.1 or SD3 transformer's layers its own way (`transformer_blocks.0.attn.to_q`); the reference
implementations that ComfyUI, Forge and kohya-ss load name them as Black Forest Labs' FLUX code
(`double_blocks.0.img_attn.qkv`) and Stability's MMDiT (`joint_blocks.0.x_block.attn.qkv`) do. A kohya LoRA module
is `lora_unet_` + that name with `_` for `.`, and ComfyUI applies `lora_up @ lora_down * alpha / rank` to the weight
of that name (comfy/lora.py: every `diffusion_model.<name>.weight` of the model is reachable as `lora_unet_<name>`).

Three things differ from a one-to-one renaming, all following diffusers' own converters of these checkpoints
(diffusers/loaders/single_file_utils.py, convert_flux_transformer_checkpoint_to_diffusers and
convert_sd3_transformer_checkpoint_to_diffusers; tests/test_flow_export.py checks the names against them):

- Fused layers. Several diffusers layers are one linear layer there, their outputs stacked: q, k, v of an
  attention (`qkv`), and in FLUX's single blocks q, k, v and the MLP input (`linear1`, widths inner x 3 and
  4 x inner). LoRAs of the parts become one LoRA of the fused layer: `lora_down` the parts' A stacked (rank = r x
  the parts present), `lora_up` block-diagonal (each part's B in its output rows and its own rank columns, zero
  elsewhere), so `up @ down` is the parts' `B A` stacked. diffusers' kohya converter splits such a LoRA back into
  the parts' exact A and B (it recognises the block-diagonal layout).
- Scale and shift. diffusers' `AdaLayerNormContinuous` (FLUX and SD3 `norm_out`, the last SD3 block's
  `norm1_context`) chunks its modulation as (scale, shift), the original code as (shift, scale): the output rows of
  `lora_up` swap halves.
- Everything else maps one to one.
"""

from __future__ import annotations

import re

import torch

# (diffusers module, original name, parts of the fused layer (None: not fused), this module's part)
_Rule = tuple[str, str, tuple[str, ...] | None, str | None]

_QKV = ("q", "k", "v")
_LINEAR1 = ("q", "k", "v", "mlp")

FLUX_RULES: tuple[_Rule, ...] = (
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"double_blocks.\1.img_attn.qkv", _QKV, r"\2"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", r"double_blocks.\1.txt_attn.qkv", _QKV, r"\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj", None, None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj", None, None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0", None, None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2", None, None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0", None, None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2", None, None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin", None, None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin", None, None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"single_blocks.\1.linear1", _LINEAR1, r"\2"),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", r"single_blocks.\1.linear1", _LINEAR1, "mlp"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2", None, None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin", None, None),
    (r"x_embedder", "img_in", None, None),
    (r"context_embedder", "txt_in", None, None),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None, None),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None, None),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None, None),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None, None),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None, None),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None, None),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, None),
    (r"proj_out", "final_layer.linear", None, None),
)

SD3_RULES: tuple[_Rule, ...] = (
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"joint_blocks.\1.x_block.attn.qkv", _QKV, r"\2"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", r"joint_blocks.\1.context_block.attn.qkv", _QKV, r"\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj", None, None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj", None, None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])", r"joint_blocks.\1.x_block.attn2.qkv", _QKV, r"\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj", None, None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1", None, None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2", None, None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1", None, None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2", None, None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1", None, None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"joint_blocks.\1.context_block.adaLN_modulation.1",
     None, None),
    (r"pos_embed\.proj", "x_embedder.proj", None, None),
    (r"context_embedder", "context_embedder", None, None),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", None, None),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", None, None),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", None, None),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", None, None),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, None),
    (r"proj_out", "final_layer.linear", None, None),
)

RULES = {"flux": FLUX_RULES, "sd3": SD3_RULES}
# where the names come from (ModelSpec `implementation`)
IMPLEMENTATION = {"flux": "https://github.com/black-forest-labs/flux", "sd3": "https://github.com/Stability-AI/sd3.5"}


def original_name(family: str, module: str) -> tuple[str, tuple[str, ...] | None, str | None]:
    """(original layer name, the fused layer's parts or None, this module's part) of a diffusers module path.
    ValueError for a module the original code has no layer for."""
    for pattern, name, parts, part in RULES[family]:
        m = re.fullmatch(pattern, module)
        if m:
            return m.expand(name), parts, (m.expand(part) if part and "\\" in part else part)
    raise ValueError(f"{family}: no original (kohya/ComfyUI) name for the transformer's module {module!r}")


def swaps_scale_shift(family: str, module: str, net_config: dict) -> bool:
    """Whether the module is an AdaLayerNormContinuous projection, (scale, shift) in diffusers and (shift, scale) in
    the original code: `norm_out.linear`, and in SD3 the last block's `norm1_context.linear` (context_pre_only)."""
    if module == "norm_out.linear":
        return True
    last = net_config.get("num_layers", 0) - 1
    return family == "sd3" and module == f"transformer_blocks.{last}.norm1_context.linear"


def part_rows(family: str, parts: tuple[str, ...], net_config: dict) -> list[int]:
    """Output rows of each part of a fused layer: inner = heads x head dim for q, k, v; FLUX's MLP input 4 x inner
    (FluxSingleTransformerBlock's mlp_ratio)."""
    inner = net_config["num_attention_heads"] * net_config["attention_head_dim"]
    return [4 * inner if p == "mlp" else inner for p in parts]


def kohya_layers(family: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 net_config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Original layer name -> (lora_down, lora_up) from diffusers module -> (A, B), with fused layers combined
    block-diagonally and the scale/shift halves swapped where the layouts differ (see the module doc). The LoRA
    scale stays wherever it is in B: the caller folds it before or writes it as alpha."""
    groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused: dict[str, tuple[str, ...]] = {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (a, b) in modules.items():
        name, parts, part = original_name(family, module)
        if parts is None:
            if swaps_scale_shift(family, module, net_config):
                shift_first = torch.cat(b.chunk(2, dim=0)[::-1])  # (scale, shift) rows -> (shift, scale)
                b = shift_first
            out[name] = (a, b)
            continue
        groups.setdefault(name, {})[part] = (a, b)
        fused[name] = parts
    for name, present in groups.items():
        out[name] = _fuse(name, fused[name], present, part_rows(family, fused[name], net_config))
    return dict(sorted(out.items()))


def _fuse(name: str, parts: tuple[str, ...], present: dict[str, tuple[torch.Tensor, torch.Tensor]],
          rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA of a fused layer from its parts' LoRAs: down = the present parts' A stacked, up = their B placed
    block-diagonally (part i's output rows x its own rank columns); absent parts get zero rows."""
    order = [p for p in parts if p in present]
    a0, b0 = present[order[0]]
    r = a0.shape[0]
    up = torch.zeros((sum(rows), r * len(order)), dtype=b0.dtype)
    row, col = 0, 0
    for p, n in zip(parts, rows):
        if p in present:
            a, b = present[p]
            if b.shape != (n, r) or a.shape[0] != r:
                raise ValueError(f"{name}: the LoRA of part {p} has A {tuple(a.shape)}, B {tuple(b.shape)}; the fused "
                                 f"layer expects B ({n}, {r}) (rows per part {rows})")
            up[row:row + n, col:col + r] = b
            col += r
        row += n
    down = torch.cat([present[p][0] for p in order], dim=0)
    return down.contiguous(), up


__all__ = ["FLUX_RULES", "IMPLEMENTATION", "RULES", "SD3_RULES", "kohya_layers", "original_name", "part_rows",
           "swaps_scale_shift"]
