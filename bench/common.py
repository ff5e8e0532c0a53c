"""Shared bits of the benchmarks: machine/version header, tables, appending to bench/RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        info = {}
        for ln in open("/proc/cpuinfo"):
            key, _, value = ln.partition(":")
            info.setdefault(key.strip(), value.strip())
        # the model name alone ("AMD EPYC") does not tell a Zen 3 from a Zen 4, nor whether bfloat16 is native
        bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in info.get("flags", "").split()]
        cpu = (f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
               f"{'+'.join(bf16) or 'no native bfloat16'})")
    except (OSError, KeyError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; python {platform.python_version()}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def versions() -> str:
    import diffusers
    import zarr

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    return f"diffusers {diffusers.__version__}, zarr {zarr.__version__}, tlcm {sha or '?'}"


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    out = ["| " + " | ".join(map(_fmt, columns)) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")  # a cell's own bar (|x|) must not end the cell


def timed(fn, repeats: int) -> float:
    """The best of `repeats` wall-clock seconds of `fn()`, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(title: str, rows: list[dict], notes: str = "", columns: list[str] | None = None,
           append: bool = True) -> str:
    """Print the table and append it, with the command, machine, versions and date, to bench/RESULTS.md."""
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], Path(__file__).parent.parent)] + sys.argv[1:])
    text = (f"\n### {title}\n\n`{cmd}` — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}; "
            f"{versions()}\n\n{table(rows, columns)}\n" + (f"\n{notes}\n" if notes else ""))
    print(text)
    if append and os.environ.get("TLCM_BENCH_NO_APPEND") != "1":
        with open(RESULTS, "a") as f:
            f.write(text)
    return text
