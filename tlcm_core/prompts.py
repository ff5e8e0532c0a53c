"""The pipeline's only external input: a list of prompts (data-free distillation)."""

from __future__ import annotations

import hashlib

from .config import toy_world
from .errors import UserError


class PromptsError(UserError, ValueError):
    pass


def load_prompts(source: str) -> list[str]:
    """'toy' or 'toy:WORLD' -> the toy world's prompts; else a UTF-8 text file on any fsspec URL, one prompt a line
    (blank lines and lines starting with '#' are skipped)."""
    world = toy_world(source)
    if world is not None:
        from .toy import get_world

        return list(get_world(world).prompts())
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


def check_prompt_lengths(prompts: list[str], teacher, source: str = "prompts") -> None:
    """Every prompt fits the teacher's tokenizer(s), checked with the tokenizers alone, before the teacher loads.

    `teacher` is a TeacherConfig. The teacher is checked first (a folder that is not a supported pipeline fails
    with a TeacherError naming it); which tokenizers and limits count is the family's (`tokenizer_limits`: SD/SDXL
    their CLIPs at 77, SD3 its CLIPs and T5, FLUX its T5 at teacher.max_sequence_length). A longer prompt would be
    silently truncated by the text encoder, so this raises PromptsError naming the lines, their token counts and the
    limit.
    """
    from .models import check_teacher, quiet_hub_logging, teacher_family

    src = check_teacher(teacher)
    import json
    import os

    index_path = os.path.join(src, "model_index.json")
    index = {}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
    quiet_hub_logging()
    too_long: dict[int, str] = {}
    for sub, tokenizer_class, limit in teacher_family(teacher).tokenizer_limits(index, teacher.max_sequence_length):
        try:
            tok = tokenizer_class.from_pretrained(src, subfolder=sub, revision=teacher.revision)
        except Exception as e:  # noqa: BLE001 - report which teacher part is unusable
            raise PromptsError(f"cannot load the teacher's {sub} from {teacher.source!r} to check the prompts: "
                               f"{type(e).__name__}: {str(e)[:200]}") from None
        limit = limit or tok.model_max_length
        ids = tok(prompts, truncation=False)["input_ids"]
        for i, (p, n) in enumerate(zip(prompts, ids)):
            if len(n) > limit and i not in too_long:
                too_long[i] = f"prompt {i + 1} ({len(n)} tokens > {limit} allowed by the {sub}): {p[:60]!r}"
    if too_long:
        lines = [too_long[i] for i in sorted(too_long)]
        raise PromptsError(f"{source}: {len(lines)} prompt(s) longer than the teacher's tokenizer allows (the text "
                           "encoder would silently cut them); shorten them:\n  " + "\n  ".join(lines[:10])
                           + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""))
