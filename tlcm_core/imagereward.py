"""ImageReward (Xu et al. 2023) without the `image-reward` package.

The package (1.5) cannot be used here: its BLIP text encoder imports `apply_chunking_to_forward`,
`find_pruneable_heads_and_indices` and `prune_linear_layer` from `transformers.modeling_utils`, which transformers 5
removed, and it pins `timm==0.6.13` (open_clip needs timm >= 1) and `fairscale`. So this module re-implements the
scoring path of its `ImageReward.score` -- BLIP ViT-L/16 image encoder at 224 px, BLIP's "MED" BERT text encoder
with cross-attention to the image tokens, the reward MLP, and the published normalisation (mean 0.16717362830052426,
std 1.0333394966054072) -- with the checkpoint's own parameter names, so the published `ImageReward.pt` (+
`med_config.json`, + the `bert-base-uncased` tokenizer) loads into it unchanged, with weights_only=True.

Shapes come from the checkpoint (ViT width, depth, patch and image size; heads = width / 64 as in ViT-B/L), the
text encoder from med_config.json; tests build a tiny random checkpoint of the same layout.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_LENGTH = 35  # ImageReward.score pads/truncates prompts to 35 tokens


# ---------------------------------------------------------------------------------------------------------------------
# BLIP's vision transformer (timm ViT layout: patch_embed.proj, cls_token, pos_embed, blocks.N, norm)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BlipViT(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.size(1)]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------------
# BLIP's MED text encoder in "multimodal" mode: BERT layers with bidirectional self-attention + image cross-attention


class _SelfAttn(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(kv_width, hidden), \
            nn.Linear(kv_width, hidden)

    def _split(self, x):
        return x.view(*x.shape[:2], self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, h, kv, mask):
        q, k, v = self._split(self.query(h)), self._split(self.key(kv)), self._split(self.value(kv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:2], -1)


class _AddNorm(nn.Module):
    def __init__(self, d_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, hidden), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention2(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.self, self.output = _SelfAttn(hidden, heads, kv_width), _AddNorm(hidden, hidden, eps)

    def forward(self, h, kv, mask):
        return self.output(self.self(h, kv, mask), h)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: dict, encoder_width: int):
        super().__init__()
        h, n, eps = c["hidden_size"], c["num_attention_heads"], c.get("layer_norm_eps", 1e-12)
        self.attention = _Attention2(h, n, h, eps)
        self.crossattention = _Attention2(h, n, encoder_width, eps)
        self.intermediate = _Dense(h, c["intermediate_size"])
        self.output = _AddNorm(c["intermediate_size"], h, eps)

    def forward(self, h, self_mask, image, image_mask):
        h = self.attention(h, h, self_mask)
        h = self.crossattention(h, image, image_mask)
        return self.output(self.intermediate(h), h)


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.word_embeddings = nn.Embedding(c["vocab_size"], h, padding_idx=c.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], h)
        self.LayerNorm = nn.LayerNorm(h, eps=c.get("layer_norm_eps", 1e-12))

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class _Encoder(nn.Module):
    def __init__(self, c: dict, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(c, encoder_width) for _ in range(c["num_hidden_layers"])])


class MedTextEncoder(nn.Module):
    def __init__(self, med_config: dict, encoder_width: int):
        super().__init__()
        if med_config.get("hidden_act", "gelu") != "gelu" or \
                med_config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("med_config: only hidden_act=gelu and absolute position embeddings (as ImageReward's)")
        self.embeddings = _Embeddings(med_config)
        self.encoder = _Encoder(med_config, encoder_width)

    def forward(self, ids, attention_mask, image_embeds):
        # BLIP's extended masks: -10000 on padding for self-attention; every image token is attended to
        self_mask = (1.0 - attention_mask[:, None, None, :].to(image_embeds.dtype)) * -10000.0
        image_mask = torch.zeros((), dtype=image_embeds.dtype, device=image_embeds.device)
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, self_mask, image_embeds, image_mask)
        return h


class _Blip(nn.Module):
    def __init__(self, vit: BlipViT, text: MedTextEncoder):
        super().__init__()
        self.visual_encoder, self.text_encoder = vit, text


class _RewardMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        # the ImageReward / LAION-aesthetic head: linear layers with dropout between them, no activations
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """`ImageReward.pt`'s modules (blip.visual_encoder, blip.text_encoder, mlp) and its scoring."""

    def __init__(self, med_config: dict, image_size: int, patch: int, vision_width: int, depth: int):
        super().__init__()
        vit = BlipViT(image_size, patch, vision_width, depth, heads=max(1, vision_width // 64))
        self.blip = _Blip(vit, MedTextEncoder(med_config, vision_width))
        self.mlp = _RewardMLP(med_config["hidden_size"])
        self.image_size = image_size

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], med_config: dict) -> ImageRewardModel:
        try:
            proj = state["blip.visual_encoder.patch_embed.proj.weight"]
            pos = state["blip.visual_encoder.pos_embed"]
        except KeyError as e:
            raise ValueError(f"not an ImageReward checkpoint (no {e.args[0]})") from None
        width, patch = proj.shape[0], proj.shape[-1]
        depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
        image_size = int(round(math.sqrt(pos.shape[1] - 1))) * patch
        model = cls(med_config, image_size, patch, width, depth)
        needed = model.state_dict()
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"ImageReward checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        bad = [k for k in needed if state[k].shape != needed[k].shape]
        if bad:
            raise ValueError(f"ImageReward checkpoint shapes do not match med_config, e.g. {bad[0]}: "
                             f"{tuple(state[bad[0]].shape)} vs {tuple(needed[bad[0]].shape)}")
        # extra tensors (BLIP's vision_proj/text_proj, position_ids) are not used by the score
        model.load_state_dict({k: state[k] for k in needed})
        return model.eval().requires_grad_(False)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(ids, attention_mask, image_embeds)
        reward = self.mlp(text[:, 0, :].float()).squeeze(-1)
        return (reward - MEAN) / STD


def load_med_config(raw: bytes) -> dict:
    c = json.loads(raw)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        if key not in c:
            raise ValueError(f"med_config.json has no {key!r}")
    return c


def init_tokenizer(name_or_path: str):
    """BLIP's tokenizer: BERT (bert-base-uncased) with [DEC] as bos and [ENC] added, as ImageReward builds it."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(name_or_path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


__all__ = ["ImageRewardModel", "MAX_TEXT_LENGTH", "init_tokenizer", "load_med_config"]
