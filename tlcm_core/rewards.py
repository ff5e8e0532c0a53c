"""Differentiable preference scorers for the reward term of stage 3 (TLCM eq. 11).

A scorer maps images in [0, 1], (B, 3, H, W), and their prompts to scores (B,) with gradients flowing back
into the images. Scorers: the toy world's (log-probability of the prompt's attributes), any CLIP model
through open_clip (100 x cosine similarity, the CLIP-score scale), and the MPS model (Zhang et al. 2024),
whose published checkpoint is a pickled model and is loaded only with `finetune.allow_pickle: true`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import UserError

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


class RewardError(UserError, RuntimeError):
    pass


def toy_scorer(world: str) -> Scorer:
    from .toy import ToyEvaluator

    ev = ToyEvaluator.load(world).requires_grad_(False)
    return lambda images, prompts: ev.reward(images, prompts)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's resize (shorter side, bicubic) + centre crop + normalisation, differentiable."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(images, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class OpenCLIPScorer(torch.nn.Module):
    """100 x cos(image, text) with an open_clip model (the CLIP-score scale papers report)."""

    def __init__(self, model, tokenizer, image_size: int):
        super().__init__()
        self.model, self.tokenizer, self.image_size = model.eval().requires_grad_(False), tokenizer, image_size

    @classmethod
    def load(cls, spec: str, device: torch.device | str = "cpu") -> OpenCLIPScorer:
        """spec = "ARCH:PRETRAINED" where PRETRAINED is an open_clip tag or a local weights file."""
        try:
            import open_clip
        except ImportError:
            raise RewardError("the open_clip scorer needs `pip install open-clip-torch`") from None
        arch, _, pretrained = spec.partition(":")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None,
                                                                    device=device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(model, open_clip.get_tokenizer(arch), int(size))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        img = self.model.encode_image(clip_preprocess(images.to(device), self.image_size))
        txt = self.model.encode_text(self.tokenizer(prompts).to(device))
        return 100 * F.cosine_similarity(img, txt, dim=-1)


def mps_scorer(path: str, allow_pickle: bool, device) -> Scorer:
    """The MPS preference model from its published checkpoint (a pickled torch model with a `score`-style
    forward over (image, text)). Pickles run code: refused unless finetune.allow_pickle is true."""
    if not allow_pickle:
        raise RewardError(f"finetune.reward_scorer=mps loads {path!r}, a pickled model: loading a pickle runs code "
                          "from the file. Set finetune.allow_pickle=true if you trust it, or use reward_scorer="
                          "open_clip")
    if not path:
        raise RewardError("finetune.reward_model must point at the MPS checkpoint (e.g. MPS_overall_checkpoint.pth)")
    model = torch.load(path, map_location=device, weights_only=False)  # explicit, documented opt-in
    model.eval().requires_grad_(False)
    for name in ("score", "forward"):
        fn = getattr(model, name, None)
        if callable(fn):
            return lambda images, prompts: fn(images, prompts)
    raise RewardError(f"{path}: the loaded object has no score/forward method")


def build_scorer(scorer: str, model: str | None, allow_pickle: bool, world: str | None, device) -> Scorer:
    if scorer == "toy":
        if world is None:
            raise RewardError("finetune.reward_scorer=toy needs a toy teacher (teacher.source: toy)")
        return toy_scorer(world)
    if scorer == "open_clip":
        if not model:
            raise RewardError("finetune.reward_model must be 'ARCH:WEIGHTS' for the open_clip scorer, e.g. "
                              "ViT-H-14:/models/open_clip_vit_h14.bin")
        return OpenCLIPScorer.load(model, device)
    if scorer == "mps":
        return mps_scorer(model or "", allow_pickle, device)
    raise RewardError(f"unknown reward scorer {scorer!r}")


def reward_hinge(s_pos: torch.Tensor, s_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """TLCM eq. 11: max(margin - s(x, c_pos), 0) + max(s(x, c_neg), 0), per sample."""
    return F.relu(margin - s_pos) + F.relu(s_neg)


def negative_prompts(prompts: list[str], pool: list[str], generator: torch.Generator) -> list[str]:
    """An irrelevant prompt for each prompt: a different one drawn from the pool."""
    out = []
    for p in prompts:
        others = [q for q in pool if q != p]
        out.append(others[int(torch.randint(len(others), (1,), generator=generator))] if others else "")
    return out
