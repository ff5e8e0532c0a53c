"""What a denoiser needs besides (x_t, t): the text conditioning of each sample, for every model family.

One row per sample in every tensor, so batches index, concatenate and expand alike, and the pair cache stores each
field as an array of rows (tlcm_core/pairs.py). Which fields a family fills (tlcm_core/families/):

  SD 1.x/2.x  prompt_embeds (B, 77, D)
  SDXL        prompt_embeds (B, 77, D1 + D2), pooled (B, Dp), time_ids (B, 6) size/crop micro-conditioning
  SD3.x       prompt_embeds (B, 77 + L, D): the two CLIPs side by side, padded to T5's width, then T5;
              pooled (B, Dp1 + Dp2) both CLIPs' projections
  FLUX.1      prompt_embeds (B, L, D) T5; pooled (B, Dp) CLIP; text_ids (B, L, 3) the text tokens' position ids;
              guidance (B,) the embedded guidance value of FLUX.1-dev, when a caller fixes it per sample
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, Dp)  SDXL, SD3, FLUX
    time_ids: torch.Tensor | None = None  # (B, 6)  SDXL only
    text_ids: torch.Tensor | None = None  # (B, L, 3)  FLUX only (diffusers passes one (L, 3) for the batch)
    guidance: torch.Tensor | None = None  # (B,)  FLUX.1-dev's guidance embedding; None: the caller's value

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(Conditioning))

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                               for f in fields(self)})

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def __getitem__(self, idx) -> Conditioning:
        return self._map(lambda v: v[idx])

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def expand(self, n: int) -> Conditioning:
        """Repeat a batch-of-one conditioning n times (e.g. the unconditional)."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    def replace(self, **values) -> Conditioning:
        return Conditioning(**{f.name: values.get(f.name, getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        def _cat(name):
            vals = [getattr(c, name) for c in items]
            return None if vals[0] is None else torch.cat(vals)

        return Conditioning(**{f.name: _cat(f.name) for f in fields(Conditioning)})

    def unet_kwargs(self) -> dict:
        """The keyword arguments of an SD/SDXL UNet2DConditionModel (tlcm_core/families/unet.py)."""
        kw = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor], prefix: str = "") -> Conditioning:
        """The inverse of `tensors`; a field missing from `t` (a pair cache written before it existed) is None."""
        return Conditioning(**{f.name: t.get(prefix + f.name) for f in fields(Conditioning)})
