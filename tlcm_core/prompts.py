"""The pipeline's only external input: a list of prompts (data-free distillation)."""

from __future__ import annotations

import hashlib


class PromptsError(ValueError):
    pass


def load_prompts(source: str) -> list[str]:
    """'toy' or 'toy:WORLD' -> the toy world's prompts; else a UTF-8 text file on any fsspec URL, one prompt a line
    (blank lines and lines starting with '#' are skipped)."""
    if source == "toy" or source.startswith("toy:"):
        from .toy import get_world

        return list(get_world(source.split(":", 1)[1] if ":" in source else "toy").prompts())
    import fsspec

    try:
        with fsspec.open(source, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PromptsError(f"prompt file {source!r} not found; set trajectories.prompts to a UTF-8 text file "
                           "with one prompt per line (or 'toy')") from None
    except Exception as e:  # permission, unreachable endpoint, ...
        raise PromptsError(f"cannot read prompt file {source!r}: {type(e).__name__}: {e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptsError(f"prompt file {source!r} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PromptsError(f"prompt file {source!r} holds no prompts (one per line expected)")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
