"""An offline CLIP BPE tokenizer for the toy worlds.

The vocabulary is CLIP-shaped: the 256 byte-level symbols and their end-of-word forms, whole-word
tokens (with intermediate BPE merges) for every word the toy worlds use, then ``<|startoftext|>`` and
``<|endoftext|>``. Any other text still tokenizes (byte fallback, character by character).
``model_max_length`` is 77 as in SD/SDXL, so the text encoders and the UNet cross-attention see the
sequence length of the real models (the extra padding costs little at toy sizes).
"""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

__all__ = ["build_tokenizer", "TOY_WORDS", "MODEL_MAX_LENGTH"]

MODEL_MAX_LENGTH = 77

# Words of every toy world (present and planned). Appending words is safe only at the end: it adds
# new token ids without changing existing ones.
TOY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "of", "on", "in", "with", "at", "to",
    "red", "green", "blue", "yellow", "orange", "purple", "white", "cyan", "magenta", "pink",
    "circle", "square", "triangle", "cross", "star", "ring", "diamond", "heart",
    "left", "right", "top", "bottom", "center", "middle", "small", "large", "big", "tiny",
    "upper", "lower", "next", "above", "below", "photo", "picture", "image", "shape", "object",
)


def _learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Plain BPE training (deterministic: most frequent pair, ties broken by the pair itself) until
    every word is one token. Encoding a word with these merges (lowest rank first, as BPE does)
    replays its training segmentation, so every toy word is exactly one ``word</w>`` token."""
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for k, seg in enumerate(segs):
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[k] = out


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = sorted(ByteLevel.alphabet())
    tokens: list[str] = list(alphabet) + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    merges = _learn_merges(words)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Build the toy CLIP tokenizer offline (deterministic; saves/loads with save/from_pretrained)."""
    vocab, merges = _vocab_and_merges(TOY_WORDS)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tok
