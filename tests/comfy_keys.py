"""ComfyUI's naming of kohya LoRA keys for SD 1.x / 2.x / SDXL UNets, re-implemented here (our own code) so the tests
can check an exported kohya file against the rule ComfyUI loads it with, independently of tlcm_core.lora_files.

The rule (ComfyUI comfy/lora.py `model_lora_keys_unet`, with comfy/utils.py `unet_to_diffusers`): ComfyUI holds the
UNet under its original (SGM / LDM) parameter names, `diffusion_model.<sgm module>.weight`. A LoRA module named
`lora_unet_<x>` patches the weight of
  1) the SGM module whose dotted name, dots replaced by `_`, is x (how kohya-ss names SDXL LoRAs), or
  2) the diffusers module whose dotted name, dots replaced by `_`, is x (how kohya-ss names SD 1.x/2.x LoRAs),
     taken to its SGM name by ComfyUI's diffusers -> SGM table of the UNet.
Its tensors are `<name>.lora_up.weight`, `<name>.lora_down.weight` and `<name>.alpha`; a key no module takes is
reported as "lora key not loaded" and ignored.

The table is built here from ComfyUI's description of the UNet (`num_res_blocks`, `channel_mult`, `transformer_depth`
per input block, `transformer_depth_output` per output block, `transformer_depth_middle`), which this module derives
from a diffusers UNet2DConditionModel config. Block numbering of the SGM UNet:
  input_blocks.0           conv_in
  input_blocks.k (k >= 1)  level x's resnets (.0) and transformers (.1), one block each, then its downsampler (.0.op)
  middle_block.0/1/2       resnet, transformer, resnet
  output_blocks.k          up level x (deepest first): nrb + 1 blocks of resnet (.0), transformer (.1) and, in the
                           level's last block, the upsampler (.1.conv, or .2.conv after a transformer)
"""

from __future__ import annotations

from itertools import accumulate

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_SPATIAL = ("norm", "proj_in", "proj_out")
_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
          "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_TOP = {"time_embed.0": ["time_embedding.linear_1"], "time_embed.2": ["time_embedding.linear_2"],
        "label_emb.0.0": ["add_embedding.linear_1", "class_embedding.linear_1"],
        "label_emb.0.2": ["add_embedding.linear_2", "class_embedding.linear_2"],
        "input_blocks.0.0": ["conv_in"], "out.0": ["conv_norm_out"], "out.2": ["conv_out"]}
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


def _per_block(value, n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


def comfy_unet_config(diffusers_config: dict) -> dict:
    """ComfyUI's description of a UNet (the fields unet_to_diffusers reads), from a diffusers UNet config."""
    down = list(diffusers_config["down_block_types"])
    n = len(down)
    nrb = _per_block(diffusers_config["layers_per_block"], n)
    depth = _per_block(diffusers_config.get("transformer_layers_per_block", 1), n)
    attn = ["CrossAttn" in t for t in down]
    chans = list(diffusers_config["block_out_channels"])
    return {
        "num_res_blocks": nrb,
        "channel_mult": [c // chans[0] for c in chans],
        # one entry per input resnet; 0 where the level has no transformer
        "transformer_depth": [depth[x] if attn[x] else 0 for x in range(n) for _ in range(nrb[x])],
        # one entry per output block, listed shallowest level first (ComfyUI pops them from the end)
        "transformer_depth_output": [depth[x] if attn[x] else 0 for x in range(n) for _ in range(nrb[x] + 1)],
        "transformer_depth_middle": depth[-1],
    }


def _transformer(prefix_diffusers: str, prefix_sgm: str, depth: int) -> dict[str, str]:
    pairs = {f"{prefix_diffusers}.{p}": f"{prefix_sgm}.{p}" for p in _SPATIAL}
    for t in range(depth):
        for p in _BLOCK:
            pairs[f"{prefix_diffusers}.transformer_blocks.{t}.{p}"] = f"{prefix_sgm}.transformer_blocks.{t}.{p}"
    return pairs


def _resnet(prefix_diffusers: str, prefix_sgm: str) -> dict[str, str]:
    return {f"{prefix_diffusers}.{d}": f"{prefix_sgm}.{s}" for s, d in _RESNET.items()}


def diffusers_to_sgm(cfg: dict) -> dict[str, str]:
    """Diffusers module path -> SGM module path for every weight-bearing module of a UNet described by `cfg`
    (comfy_unet_config). Like ComfyUI's table it also lists a downsampler for the last level, which no UNet has."""
    nrb, n = cfg["num_res_blocks"], len(cfg["channel_mult"])
    depth_in, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    out: dict[str, str] = {}
    first_in = [1 + s for s in accumulate((r + 1 for r in nrb), initial=0)]
    for x in range(n):
        for i in range(nrb[x]):
            k = first_in[x] + i
            out.update(_resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{k}.0"))
            d = depth_in.pop(0)
            if d:
                out.update(_transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{k}.1", d))
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{first_in[x] + nrb[x]}.0.op"
    out.update(_resnet("mid_block.resnets.0", "middle_block.0"))
    out.update(_transformer("mid_block.attentions.0", "middle_block.1", cfg["transformer_depth_middle"]))
    out.update(_resnet("mid_block.resnets.1", "middle_block.2"))
    up_nrb = list(reversed(nrb))
    first_out = list(accumulate((r + 1 for r in up_nrb), initial=0))
    for x in range(n):
        blocks = up_nrb[x] + 1
        for i in range(blocks):
            k = first_out[x] + i
            out.update(_resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{k}.0"))
            d = depth_out.pop()  # the deepest level's blocks are at the end of the list
            if d:
                out.update(_transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{k}.1", d))
            if i == blocks - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if d else 1}.conv"
    for sgm, names in _TOP.items():
        for d in names:
            out[d] = sgm
    return out


def comfy_lora_key_map(diffusers_config: dict, weight_modules: set[str]) -> dict[str, str]:
    """`lora_unet_*` name -> the SGM module ComfyUI patches, for a UNet whose weight-bearing modules (diffusers
    paths) are `weight_modules`: rule 1 over the SGM modules the model has, rule 2 over its diffusers names."""
    table = {d: s for d, s in diffusers_to_sgm(comfy_unet_config(diffusers_config)).items() if d in weight_modules}
    key_map = {}
    for d, s in table.items():
        key_map["lora_unet_" + s.replace(".", "_")] = s  # 1) the model's own (SGM) parameter names
    for d, s in table.items():
        key_map["lora_unet_" + d.replace(".", "_")] = s  # 2) diffusers names through the table
    return key_map


def load_like_comfy(lora_keys: set[str], key_map: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """What ComfyUI's load_lora does with a kohya file's keys: {lora module name: SGM module it patches} for each
    name with an up/down pair, and the keys it leaves unloaded."""
    patched, loaded = {}, set()
    for name, target in key_map.items():
        if f"{name}.lora_up.weight" in lora_keys and f"{name}.lora_down.weight" in lora_keys:
            patched[name] = target
            loaded |= {f"{name}{s}" for s in LORA_SUFFIXES} & lora_keys
    return patched, lora_keys - loaded
