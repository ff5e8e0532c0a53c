"""Latent LPIPS: an LPIPS distance computed directly on VAE latents (TLCM, "bag of techniques").

The network is VGG-16 with a 4-channel first convolution and its first three max-pools removed (latents are
already 8x down), LPIPS' learned linear heads and LPIPS normalization (Zhang et al. 2018): unit-normalize each
layer's features over channels, square the difference, weight channels with a non-negative 1x1 conv, average
over space and sum over the five layers. There is no ImageNet scaling layer: inputs are latents as the UNet sees
them (scaled by the VAE's scaling_factor).

Module names mirror the `lpips` package (`net.slice1..5` keep torchvision's `features` indices, `lin0..4.model.1`)
so that state dicts written by lpips-style code load without renaming. `width` scales every channel count
(1.0 = the paper's network for SDXL; 1/8 is a CPU-sized variant for the toy world's 4x16x16 latents).

Weights: `load_latent_lpips` reads a state dict (the published `latent-lpips.pth`, our own safetensors, lpips or
plain VGG `features.N` naming), checks every shape and fails naming the key; `save_latent_lpips` writes
safetensors with the width in the metadata.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

__all__ = [
    "LatentLPIPS", "LatentLPIPSWeightsError", "NetLinLayer", "RankingHead", "load_latent_lpips",
    "map_state_dict", "save_latent_lpips", "twoafc_score",
]

# VGG-16 ("D") `features` with torchvision's indices: conv (in, out) at these indices, each followed by a ReLU.
_VGG16_CONVS = {0: (None, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
                28: (512, 512)}
_REMOVED_POOLS = (4, 9, 16)  # the first three max-pools: latents are already 8x down
_KEPT_POOL = 23
# lpips' slices over `features` (taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_CHANNELS = (64, 128, 256, 512, 512)
# The same convolutions numbered as in a `features` Sequential with the three pools deleted (not replaced).
_COMPACT_TO_TV = dict(zip((0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 21, 23, 25), sorted(_VGG16_CONVS)))

PUBLISHED_HINT = ("use the published latent-lpips.pth (huggingface.co/AIGCer-OPPO/TLCM) or the "
                  "latent_lpips.safetensors written by the latent-lpips stage")


class LatentLPIPSWeightsError(UserError, ValueError):
    """A weights file that does not fit LatentLPIPS; the message names the key, the shapes and what to use."""


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class NetLinLayer(nn.Module):
    """LPIPS' linear head: dropout then a 1x1 conv to one channel without bias (weights kept >= 0)."""

    def __init__(self, channels: int, dropout: float = 0.5):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LatentVGG16(nn.Module):
    """VGG-16 features in lpips' five slices, 4-channel input, max-pools 4, 9 and 16 removed."""

    def __init__(self, in_channels: int = 4, width: float = 1.0):
        super().__init__()
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(lo, hi):
                if i in _VGG16_CONVS:
                    cin, cout = _VGG16_CONVS[i]
                    cin = in_channels if cin is None else _scaled(cin, width)
                    s.add_module(str(i), nn.Conv2d(cin, _scaled(cout, width), 3, padding=1))
                elif i == _KEPT_POOL:
                    s.add_module(str(i), nn.MaxPool2d(2, 2))
                elif i not in _REMOVED_POOLS:
                    s.add_module(str(i), nn.ReLU(inplace=True))
            setattr(self, f"slice{k}", s)
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """lpips.normalize_tensor; eps^2 inside the sqrt keeps the gradient finite where a feature vector is zero."""
    return x / ((x.pow(2).sum(dim=1, keepdim=True) + eps * eps).sqrt() + eps)


class LatentLPIPS(nn.Module):
    """`LatentLPIPS(width)(x, y) -> (B,)`: LPIPS between two batches of latents (B, 4, h, w)."""

    def __init__(self, width: float = 1.0, in_channels: int = 4, dropout: float = 0.5):
        super().__init__()
        if not 0 < width <= 4:
            raise ValueError(f"width={width}: must be in (0, 4] (1.0 = VGG-16 as in the paper)")
        self.width, self.in_channels = float(width), int(in_channels)
        self.channels = tuple(_scaled(c, width) for c in _CHANNELS)
        self.net = LatentVGG16(in_channels, width)
        for k, c in enumerate(self.channels):
            lin = NetLinLayer(c, dropout)
            nn.init.constant_(lin.model[1].weight, 1.0 / c)  # non-negative start: a plain mean over channels
            setattr(self, f"lin{k}", lin)

    @property
    def lins(self) -> list[NetLinLayer]:
        # a property, not a ModuleList: lpips registers both and so stores every head twice
        return [getattr(self, f"lin{k}") for k in range(5)]

    def layer_distances(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer LPIPS terms, each (B,)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"latent LPIPS takes two (B, {self.in_channels}, h, w) batches of the same shape; "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        feats = self.net(torch.cat([x, y]))  # one pass for both inputs
        out = []
        for f, lin in zip(feats, self.lins):
            f = normalize_tensor(f.float())
            diff = (f[:n] - f[n:]).pow(2)
            out.append(lin(diff.to(lin.model[1].weight.dtype)).float().mean(dim=(1, 2, 3)))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.lin0.model[1].weight
        return torch.stack(self.layer_distances(x.to(p.dtype), y.to(p.dtype))).sum(0)

    @torch.no_grad()
    def clamp_heads(self) -> None:
        """LPIPS keeps the head weights non-negative after each optimizer step (a distance must not go below 0)."""
        for lin in self.lins:
            lin.model[1].weight.clamp_(min=0)

    def metadata(self, **extra: str) -> dict[str, str]:
        return {"format": "tlcm-latent-lpips/1", "width": repr(self.width), "in_channels": str(self.in_channels),
                **{k: str(v) for k, v in extra.items()}}


class RankingHead(nn.Module):
    """2AFC ranking net on (d0, d1) -> logit that a judge prefers p1 (i.e. finds p0 farther), for a BCE loss.

    lpips' Dist2LogitLayer (1x1 convs on [d0, d1, d0-d1, d0/(d1+eps), d1/(d0+eps)]) made antisymmetric, plus a
    term k*(log d0 - log d1) with k > 0. Unconstrained, the small net is free to learn either orientation, and a
    metric trained from scratch that starts out ranking wrongly is then trained toward the inverted metric; here
    swapping p0 and p1 always flips the prediction and a larger d0 always favours p1.
    """

    def __init__(self, chn_mid: int = 32):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(5, chn_mid, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(chn_mid, chn_mid, 1),
                                   nn.LeakyReLU(0.2, True), nn.Conv2d(chn_mid, 1, 1))
        self.log_scale = nn.Parameter(torch.tensor(1.0))

    def _net(self, d0: torch.Tensor, d1: torch.Tensor, eps: float) -> torch.Tensor:
        return self.model(torch.cat((d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)), dim=1)).flatten()

    def forward(self, d0: torch.Tensor, d1: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
        d0, d1 = d0.reshape(-1, 1, 1, 1), d1.reshape(-1, 1, 1, 1)
        ratio = (torch.log(d0 + 1e-8) - torch.log(d1 + 1e-8)).flatten()
        return F.softplus(self.log_scale) * 4 * ratio + torch.tanh(self._net(d0, d1, eps) - self._net(d1, d0, eps))


def twoafc_score(d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """Per-triplet 2AFC agreement (lpips.trainer.score_2afc_dataset): judge = fraction preferring p1."""
    d0, d1, judge = d0.flatten().double(), d1.flatten().double(), judge.flatten().double()
    return (d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def _expected_shapes(width: float, in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for k, (lo, hi) in enumerate(_SLICES, start=1):
        for i in range(lo, hi):
            if i in _VGG16_CONVS:
                cin, cout = _VGG16_CONVS[i]
                cin = in_channels if cin is None else _scaled(cin, width)
                shapes[f"net.slice{k}.{i}.weight"] = (_scaled(cout, width), cin, 3, 3)
                shapes[f"net.slice{k}.{i}.bias"] = (_scaled(cout, width),)
    for k, c in enumerate(_CHANNELS):
        shapes[f"lin{k}.model.1.weight"] = (1, _scaled(c, width), 1, 1)
    return shapes


def _slice_of(index: int) -> int:
    for k, (lo, hi) in enumerate(_SLICES, start=1):
        if lo <= index < hi:
            return k
    raise KeyError(index)


_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "vgg.", "lpips.", "latent_lpips.", "perceptual.")
_RE_SLICE = re.compile(r"slice([1-5])\.(\d+)\.(weight|bias)$")
_RE_FEATURES = re.compile(r"features\.(\d+)\.(weight|bias)$")
_RE_LIN = re.compile(r"(?:^|\.)(?:lin([0-4])|lins\.([0-4]))\.(?:model\.\d+\.)?weight$")


def map_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename the key variants of a latent LPIPS state dict to ours.

    Understood: our/lpips names (`net.slice3.10.weight`, `lin2.model.1.weight`), the same with `module.`/
    `_orig_mod.` or other wrapper prefixes, without `net.`, lpips' duplicate `lins.N` heads, heads without dropout
    (`lin0.model.0.weight`) or flat (`lin0.weight`), and plain VGG `features.N` numbering -- torchvision's (pools
    replaced by Identity) or compact (the three pools deleted). Returns (mapped, keys it could not place).
    """
    keys = list(state)
    feat_idx = {int(m.group(1)) for k in keys if (m := _RE_FEATURES.search(k)) and m.group(2) == "weight"}
    compact = bool(feat_idx) and feat_idx <= set(_COMPACT_TO_TV) and not feat_idx <= set(_VGG16_CONVS)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in keys:
        t = state[key]
        if m := _RE_SLICE.search(key):
            new = f"net.slice{m.group(1)}.{m.group(2)}.{m.group(3)}"
        elif m := _RE_FEATURES.search(key):
            i = int(m.group(1))
            i = _COMPACT_TO_TV.get(i, -1) if compact else i
            if i not in _VGG16_CONVS:
                unknown.append(key)
                continue
            new = f"net.slice{_slice_of(i)}.{i}.{m.group(2)}"
        elif m := _RE_LIN.search(key):
            new = f"lin{m.group(1) or m.group(2)}.model.1.weight"
        else:
            unknown.append(key)
            continue
        if new in out:  # lpips stores each head twice (lin0 and lins.0): they must agree
            if out[new].shape != t.shape or not torch.equal(out[new], t):
                raise LatentLPIPSWeightsError(f"two different tensors map to {new!r} (one is {key!r})")
            continue
        out[new] = t
    return out, unknown


def _read_bytes(path_or_url: str | Path) -> bytes:
    s = str(path_or_url)
    if "://" in s and not s.startswith("file://"):
        import fsspec

        with fsspec.open(s, "rb") as f:
            return f.read()
    p = Path(s[len("file://"):] if s.startswith("file://") else s)
    if not p.is_file():
        raise FileNotFoundError(f"latent LPIPS weights {s!r} not found; {PUBLISHED_HINT}")
    return p.read_bytes()


def _read_state(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors or a weights_only torch file; never unpickles arbitrary objects."""
    if len(data) > 8 and data[8:9] == b"{":  # safetensors: u64 header size, then a JSON header
        from safetensors.torch import load

        try:
            state = load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        except Exception as e:  # noqa: BLE001 - a broken file, say which
            raise LatentLPIPSWeightsError(f"{where}: unreadable safetensors file ({e}); {PUBLISHED_HINT}") from None
        return state, meta
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler's refusal or a corrupt file
        raise LatentLPIPSWeightsError(
            f"{where}: refused to load: not a plain state dict of tensors (torch.load(weights_only=True) says: "
            f"{str(e).splitlines()[0][:300]}). Only safetensors or tensor-only torch files are read; "
            f"{PUBLISHED_HINT}") from None
    # checkpoints often wrap the state dict
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [obj[k] for k in ("state_dict", "model", "net", "lpips") if isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        obj = inner[0]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, Mapping) else "a mapping with non-tensor values"
        raise LatentLPIPSWeightsError(f"{where}: holds {what}, not a state dict of tensors; {PUBLISHED_HINT}")
    return dict(obj), {}


def load_latent_lpips(path_or_url: str | Path | bytes, *, width: float | None = None, strict: bool = True,
                      device: torch.device | str = "cpu", where: str | None = None) -> LatentLPIPS:
    """A frozen LatentLPIPS (eval mode, no grad) from a weights file, any fsspec URL, or the file's bytes.

    `width` defaults to the file's (safetensors metadata, else the first conv's channels / 64). Every tensor's
    shape is checked; a missing key, a wrong shape or (with `strict`) a key we cannot place raises
    LatentLPIPSWeightsError naming the key.
    """
    if isinstance(path_or_url, bytes):
        data, where = path_or_url, where or "latent LPIPS weights"
    else:
        data, where = _read_bytes(path_or_url), where or str(path_or_url)
    state, meta = _read_state(data, where)
    mapped, unknown = map_state_dict(state)
    if unknown and strict:
        raise LatentLPIPSWeightsError(
            f"{where}: {len(unknown)} key(s) that are not part of latent LPIPS (VGG-16 slices + lin0..4 heads), e.g. "
            f"{unknown[:5]}; an input scaling layer or a classifier head means this is not a latent LPIPS file. "
            f"{PUBLISHED_HINT} (strict=False ignores such keys)")
    first = mapped.get("net.slice1.0.weight")
    if first is None:
        raise LatentLPIPSWeightsError(f"{where}: no first convolution (net.slice1.0.weight / features.0.weight) "
                                      f"among {len(state)} keys, e.g. {list(state)[:5]}; {PUBLISHED_HINT}")
    if first.ndim == 4 and first.shape[1] != 4:
        raise LatentLPIPSWeightsError(
            f"{where}: key 'net.slice1.0.weight' expects shape (64*width, 4, 3, 3), found {tuple(first.shape)}: "
            f"{first.shape[1]} input channels -- pixel-space VGG/LPIPS weights, not latent LPIPS (4-channel latents); "
            f"{PUBLISHED_HINT}")
    if width is None:
        width = float(meta["width"]) if "width" in meta else first.shape[0] / 64
    expected = _expected_shapes(width)
    for key, shape in expected.items():
        if key not in mapped:
            raise LatentLPIPSWeightsError(f"{where}: missing key {key!r} (expected shape {shape}, width {width:g}); "
                                          f"the file has {len(mapped)} latent LPIPS tensors; {PUBLISHED_HINT}")
        if tuple(mapped[key].shape) != shape:
            raise LatentLPIPSWeightsError(f"{where}: key {key!r} expects shape {shape} (width {width:g}), found "
                                          f"{tuple(mapped[key].shape)}; {PUBLISHED_HINT}")
    extra = sorted(set(mapped) - set(expected))
    if extra and strict:
        raise LatentLPIPSWeightsError(f"{where}: unexpected key(s) {extra[:5]} for VGG-16 latent LPIPS; "
                                      f"{PUBLISHED_HINT}")
    model = LatentLPIPS(width=width)
    model.load_state_dict({k: mapped[k].float() for k in expected})
    if any(bool((lin.model[1].weight < 0).any()) for lin in model.lins):
        raise LatentLPIPSWeightsError(f"{where}: negative linear-head weights (lin*.model.1.weight): LPIPS heads are "
                                      "non-negative, so this is not a trained LPIPS head")
    return model.to(device).eval().requires_grad_(False)


def save_latent_lpips(model: LatentLPIPS, path: str | Path | None = None, **metadata: str) -> bytes:
    """safetensors bytes of `model` (written to `path` when given), metadata: format, width, source, ..."""
    from safetensors.torch import save

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata=model.metadata(**metadata))
    if path is not None:
        Path(path).write_bytes(data)
    return data
