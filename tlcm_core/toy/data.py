"""Procedural text-image worlds for the toy test bed.

A :class:`World` is a list of attributes (name -> ordered values), a prompt template and a renderer.
Its prompts are the cartesian product of the attribute values in declaration order, so
``prompts()`` is fixed for a world forever. New worlds (more colours, shapes, positions, two objects)
are added as new entries in ``WORLDS`` with their own renderer; existing worlds never change their
prompts, images or RNG draw order, so artifacts made with them stay valid.

Everything is deterministic by seed (a private ``torch.Generator``) and vectorized: 40k images of the
"toy" world render in a few seconds on one thread.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["World", "WORLDS", "get_world", "world_names"]

# Renderer: (labels [n, n_attr] long, generator, image size) -> images [n, 3, H, W] in [0, 1]
Renderer = Callable[[torch.Tensor, torch.Generator, int], torch.Tensor]


@dataclass(frozen=True)
class World:
    """A procedural text-image world.

    ``attributes`` maps attribute name -> ordered class names; ``template`` is a ``str.format``
    template over the attribute names (e.g. ``"a {color} {shape}"``).
    """

    name: str
    attributes: dict[str, list[str]]
    template: str
    renderer: Renderer = field(repr=False)
    image_size: int = 32
    spatial: bool = False  # attributes tied to image regions: the evaluator keeps its spatial layout
    # How ``sample`` picks prompts (part of the RNG draw order): "mod" = randperm(n) % P (the "toy" world's;
    # balanced only when n >= P), "blocks" = consecutive random permutations of all P prompts, cut to n
    # (balanced and covering random prompts for any n: needed when P is larger than a batch).
    prompt_order: str = "mod"
    chunk: int = 4096  # render chunk (part of the RNG draw order: never change for an existing world)

    # ---------------------------------------------------------------- prompts
    def prompts(self) -> list[str]:
        """All prompts, in the fixed order: cartesian product of attribute values (first attr slowest)."""
        names = list(self.attributes)
        out = []
        for combo in itertools.product(*(self.attributes[n] for n in names)):
            out.append(self.template.format(**dict(zip(names, combo))))
        return out

    @property
    def num_prompts(self) -> int:
        return math.prod(len(v) for v in self.attributes.values())

    def labels_of_prompt_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Prompt indices [n] -> attribute class indices [n, n_attr] (mixed radix, first attr slowest)."""
        sizes = [len(v) for v in self.attributes.values()]
        out = []
        rem = idx.clone().long()
        for k in range(len(sizes) - 1, -1, -1):
            out.append(rem % sizes[k])
            rem = rem // sizes[k]
        return torch.stack(out[::-1], dim=1)

    def parse_prompt(self, prompt: str) -> dict[str, int]:
        """Prompt -> {attribute: class index}. Raises ValueError for a prompt not in this world."""
        table = self._prompt_table()
        key = " ".join(prompt.strip().lower().split())
        if key not in table:
            raise ValueError(
                f"prompt {prompt!r} is not a prompt of world {self.name!r}; expected the template "
                f"{self.template!r} with " + ", ".join(f"{k} in {v}" for k, v in self.attributes.items())
            )
        return dict(table[key])

    def labels(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> attribute class indices [n, n_attr] (attribute order of ``attributes``)."""
        names = list(self.attributes)
        return torch.tensor([[self.parse_prompt(p)[a] for a in names] for p in prompts], dtype=torch.long)

    def _prompt_table(self) -> dict[str, dict[str, int]]:
        cache = self.__dict__.get("_table")
        if cache is None:
            names = list(self.attributes)
            cache = {}
            for combo in itertools.product(*(range(len(self.attributes[n])) for n in names)):
                text = self.template.format(**{n: self.attributes[n][i] for n, i in zip(names, combo)})
                cache[text] = dict(zip(names, combo))
            object.__setattr__(self, "_table", cache)
        return cache

    # ---------------------------------------------------------------- images
    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        """``n`` images (float [0,1], shape (n, 3, H, W)) and their prompts, balanced over prompts.

        Every prompt appears ``n // P`` or ``n // P + 1`` times (for "mod" worlds: when n >= P); see
        ``prompt_order``. Deterministic in (n, seed).
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        g = torch.Generator().manual_seed(int(seed))
        P = self.num_prompts
        if self.prompt_order == "blocks":
            pidx = torch.cat([torch.randperm(P, generator=g) for _ in range(-(-n // P))] or [torch.zeros(0, dtype=torch.long)])[:n]
        else:
            pidx = torch.randperm(n, generator=g) % P
        labels = self.labels_of_prompt_index(pidx)
        images = torch.empty(n, 3, self.image_size, self.image_size)
        for s in range(0, n, self.chunk):
            images[s : s + self.chunk] = self.renderer(labels[s : s + self.chunk], g, self.image_size)
        all_prompts = self.prompts()
        return images, [all_prompts[i] for i in pidx.tolist()]


# ------------------------------------------------------------------------------------ "toy" world

_TOY_RGB = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.78, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.88, 0.15),
}


def _u(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def _shape_masks(shape_idx: torch.Tensor, cx, cy, r, size: int, ss: int = 2) -> torch.Tensor:
    """Anti-aliased coverage [n, 1, size, size] of circle/square/triangle/cross (supersampled ss x ss)."""
    n = shape_idx.shape[0]
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss  # pixel units
    y = coords.view(1, -1, 1)
    x = coords.view(1, 1, -1)
    dx = x - cx.view(n, 1, 1)
    dy = y - cy.view(n, 1, 1)
    rr = r.view(n, 1, 1)
    adx, ady = dx.abs(), dy.abs()
    circle = dx * dx + dy * dy <= rr * rr
    square = torch.maximum(adx, ady) <= 0.85 * rr
    # upward triangle: apex at cy - 1.05r, base at cy + 0.85r, half-width at base 1.1r
    top, bot = -1.05 * rr, 0.85 * rr
    frac = (dy - top) / (bot - top)
    triangle = (dy >= top) & (dy <= bot) & (adx <= frac * 1.1 * rr)
    w = 0.32 * rr
    cross = ((adx <= w) & (ady <= rr)) | ((ady <= w) & (adx <= rr))
    sel = shape_idx.view(n, 1, 1)
    m = torch.where(sel == 0, circle, torch.where(sel == 1, square, torch.where(sel == 2, triangle, cross)))
    m = m.float().unsqueeze(1)
    return torch.nn.functional.avg_pool2d(m, ss)


def _render_toy(labels: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """One object (colour x shape) at random position/size on a dark, tinted, noisy background.

    RNG draw order (frozen): r, cx, cy, colour jitter, brightness, bg level, bg tint, gradient
    direction, gradient amplitude, noise std, pixel noise.
    """
    n = labels.shape[0]
    color_idx, shape_idx = labels[:, 0], labels[:, 1]
    r = _u(g, n, 4.5, 10.5)
    ext = r * 1.06 + 1.0  # keeps every shape inside the frame
    cx = ext + (size - 2 * ext) * torch.rand(n, generator=g)
    cy = ext + (size - 2 * ext) * torch.rand(n, generator=g)
    base = torch.tensor([_TOY_RGB[c] for c in _TOY_RGB])[color_idx]  # [n, 3]
    color = (base + _u(g, n, -0.07, 0.07, 3)) * _u(g, n, 0.85, 1.05, 1)
    bg, noise = _background(g, n, size)
    mask = _shape_masks(shape_idx, cx, cy, r, size)
    img = bg * (1 - mask) + color.view(n, 3, 1, 1) * mask + noise
    return img.clamp_(0.0, 1.0)


_HARD_RGB = dict(_TOY_RGB, purple=(0.62, 0.20, 0.85))


def _background(g: torch.Generator, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "toy" world's dark, tinted, graded background [n, 3, H, W] and its pixel noise (added last).
    RNG draw order: bg level, bg tint, gradient direction, gradient amplitude, noise std, pixel noise."""
    bg_level = _u(g, n, 0.02, 0.22, 1)
    bg_tint = _u(g, n, -0.06, 0.06, 3)
    theta = _u(g, n, 0.0, 2 * math.pi)
    amp = _u(g, n, 0.0, 0.08)
    noise_std = _u(g, n, 0.0, 0.03)
    noise = torch.randn(n, 3, size, size, generator=g) * noise_std.view(n, 1, 1, 1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    grad = torch.cos(theta).view(n, 1, 1) * coords.view(1, 1, -1) + torch.sin(theta).view(n, 1, 1) * coords.view(1, -1, 1)
    return (bg_level + bg_tint).view(n, 3, 1, 1) + (amp.view(n, 1, 1) * grad).unsqueeze(1), noise


def _two_object_layout(g: torch.Generator, n: int, size: int, tries: int = 16):
    """Radii and centres of two objects anywhere in the frame, not overlapping and at least 4 px apart in x, sorted
    left to right. ``tries`` candidate layouts are drawn per image (a fixed number: the draw order does not depend on
    the outcome) and the first valid one is kept; if none is (3% of images: two large objects), they go to the two halves (a
    large object there may be cut by the frame edge by a pixel)."""
    r = _u(g, n, 3.5, 7.5, 2)
    ext = r * 1.06 + 0.5
    cand = torch.rand(n, tries, 2, 2, generator=g)  # [n, try, object, (x, y)]
    lo, span = ext.view(n, 1, 2, 1), (size - 2 * ext).view(n, 1, 2, 1)
    c = lo + span * cand
    dist = (c[:, :, 0] - c[:, :, 1]).norm(dim=-1)
    ok = (dist >= ext.sum(1, keepdim=True)) & ((c[:, :, 0, 0] - c[:, :, 1, 0]).abs() >= 4.0)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = c[torch.arange(n), first.clamp_min(0)]  # [n, 2, 2]
    half = size / 2
    fallback = torch.stack([torch.stack([ext[:, 0] + (half - 2 * ext[:, 0]).clamp_min(0) * cand[:, 0, 0, 0],
                                         pick[:, 0, 1]], -1),
                            torch.stack([half + ext[:, 1] + (half - 2 * ext[:, 1]).clamp_min(0) * cand[:, 0, 1, 0],
                                         pick[:, 1, 1]], -1)], 1)
    pick = torch.where((first < 0).view(n, 1, 1), fallback, pick)
    swap = pick[:, 0, 0] > pick[:, 1, 0]  # object 0 is the left one
    order = torch.stack([swap.long(), 1 - swap.long()], 1)
    return r.gather(1, order), pick.gather(1, order.view(n, 2, 1).expand(n, 2, 2))


def _render_toy_hard(labels: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Two objects with their own colour and shape, the first left of the second, anywhere in the frame (random
    sizes, never overlapping), on the "toy" world's background.

    What the prompt leaves open (where each object is and how big) is what few-step samplers get wrong; binding
    (which colour and shape go with the left object) is what the teacher must learn.
    RNG draw order (frozen): layout (radii, candidate centres), colour jitter and brightness (left, right),
    background (see ``_background``).
    """
    n = labels.shape[0]
    palette = torch.tensor(list(_HARD_RGB.values()))
    r, c = _two_object_layout(g, n, size)
    colors = [(palette[labels[:, 2 * k]] + _u(g, n, -0.07, 0.07, 3)) * _u(g, n, 0.85, 1.05, 1) for k in range(2)]
    img, noise = _background(g, n, size)
    for k in range(2):
        mask = _shape_masks(labels[:, 2 * k + 1], c[:, k, 0], c[:, k, 1], r[:, k], size)
        img = img * (1 - mask) + colors[k].view(n, 3, 1, 1) * mask
    return (img + noise).clamp_(0.0, 1.0)


WORLDS: dict[str, World] = {
    "toy": World(
        name="toy",
        attributes={
            "color": ["red", "green", "blue", "yellow"],
            "shape": ["circle", "square", "triangle", "cross"],
        },
        template="a {color} {shape}",
        renderer=_render_toy,
    ),
    # The harder world (issue #10): 400 prompts, four attributes, room between few-step and 25-step sampling.
    "toy-hard": World(
        name="toy-hard",
        attributes={
            "left_color": list(_HARD_RGB),
            "left_shape": ["circle", "square", "triangle", "cross"],
            "right_color": list(_HARD_RGB),
            "right_shape": ["circle", "square", "triangle", "cross"],
        },
        template="a {left_color} {left_shape} left of a {right_color} {right_shape}",
        renderer=_render_toy_hard,
        spatial=True,
        prompt_order="blocks",
    ),
}


def world_names() -> list[str]:
    return list(WORLDS)


def get_world(name: str = "toy") -> World:
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown toy world {name!r}; known: {world_names()}") from None
