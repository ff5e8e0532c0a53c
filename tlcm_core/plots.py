"""Plots a person looks at: training loss curves and metrics against sampling steps, as PNG bytes.

Small pure functions (rows in, PNG out) on matplotlib's Agg canvas, never pyplot: no global figure state, no
display, safe in worker threads and subprocesses.
"""

from __future__ import annotations

import io
import math

# columns of a training log row that are bookkeeping, not loss terms (tlcm_core/training.py)
LOG_BOOKKEEPING = ("step", "lr", "elapsed_s", "phase")
# metrics of an evaluate row worth a curve against steps (tlcm_core/evaluation.py, tlcm_core/metrics.py), with the
# direction that is better, for the axis label
STEP_METRICS = {"prompt_accuracy": ("prompt accuracy", "higher"), "frechet": ("Frechet distance", "lower"),
                "fid": ("FID", "lower"), "clip_score": ("CLIP score", "higher"),
                "aesthetic_score": ("aesthetic score", "higher"), "image_reward": ("ImageReward", "higher")}
# the teacher's baseline rows (tlcm_core/evaluation.py): DDIM + CFG on trailing timesteps for a DDPM-time teacher,
# Euler on its own shifted sigma grid for a flow teacher (FLUX.1, SD3), as its stock pipeline samples
TEACHER_METHOD = "teacher-ddim-cfg"
TEACHER_METHODS = {TEACHER_METHOD: "teacher DDIM+CFG", "teacher-euler": "teacher Euler"}  # method -> label


def is_teacher(method: str | None) -> bool:
    return method in TEACHER_METHODS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figure(panels: int, width_per_panel: float = 4.2, height: float = 3.2, max_cols: int = 3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, max_cols)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width_per_panel * cols, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_terms(rows: list[dict]) -> list[str]:
    """The logged loss terms, `loss` (the student's total) first: consistency stages log `loss` only, finetune also
    `reward`, `dmd`, `gan_g`, `fake`, `gan_d`."""
    terms: list[str] = []
    for r in rows:
        terms += [k for k, v in r.items() if k not in LOG_BOOKKEEPING and k not in terms
                  and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sorted(terms, key=lambda k: (k != "loss", terms.index(k)))


def loss_curves_png(rows: list[dict], title: str) -> bytes:
    """One panel per loss term against the training step (a log y axis where a term is positive and spans more
    than a factor of 20: consistency losses fall by orders of magnitude)."""
    from matplotlib.ticker import MaxNLocator

    terms = loss_terms(rows) or ["loss"]
    fig, axes = _figure(len(terms), width_per_panel=6.0 if len(terms) == 1 else 4.2)
    for ax, term in zip(axes, terms):
        pts = [(r["step"], r[term]) for r in rows if isinstance(r.get(term), (int, float)) and "step" in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) <= 30 else None, markersize=3, linewidth=1.5)
            if min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no logged values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(term if term != "loss" else "loss (student total)", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def step_metrics(rows: list[dict]) -> list[str]:
    return [m for m in STEP_METRICS if any(isinstance(r.get(m), (int, float)) for r in rows)]


def metrics_vs_steps_png(rows: list[dict], title: str = "") -> bytes:
    """Each metric against sampling steps: the student's rows as a line over its step counts (with the 95% interval
    of prompt accuracy as a band), each teacher row as a dashed horizontal reference labelled with its steps."""
    metrics = step_metrics(rows) or ["seconds_per_image"]
    fig, axes = _figure(len(metrics), width_per_panel=4.6, height=3.4)
    student = sorted((r for r in rows if not is_teacher(r.get("method"))), key=lambda r: r["steps"])
    teacher = sorted((r for r in rows if is_teacher(r.get("method"))), key=lambda r: r["steps"])
    for ax, m in zip(axes, metrics):
        label, better = STEP_METRICS.get(m, ("seconds per image", "lower"))
        pts = [(r["steps"], r[m]) for r in student if isinstance(r.get(m), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", linewidth=2, color="C0", label=f"student ({student[0]['method']})")
            band = [r.get("accuracy_ci95") for r in student] if m == "prompt_accuracy" else []
            if band and all(isinstance(b, list) and len(b) == 2 for b in band):
                ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color="C0", alpha=0.15)
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(xs), [str(x) for x in xs])
        for i, r in enumerate(r for r in teacher if isinstance(r.get(m), (int, float))):
            ax.axhline(r[m], color=f"C{i + 1}", linestyle="--", linewidth=1.2,
                       label=f"{TEACHER_METHODS[r['method']]} @{r['steps']}")
        ax.set_title(f"{label} ({better} is better)", fontsize=10)
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _png(fig)
