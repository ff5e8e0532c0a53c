"""A sharded stage's missing shards filled by several local processes on a CPU (compute.cpu_processes).

The trajectory stages sample with frozen models, shard by shard. On a CPU, torch's threads help as far as the layers
are large enough and the other cores idle (two threads sample toy-hard 1.6x as fast as one on an idle 2-core CPU,
and a busy machine slows threads down many times); processes use each core whatever the layers' sizes, and the
shards are independent of each other. With compute.cpu_processes = N > 1, the stage
boundary (tlcm_core.pipeline.execute) starts N processes, each filling a contiguous group of the missing shards with
1/N of the cores' threads, as the deployment's shard runs do across workers, and waits for them, forwarding the
shards' progress. The stage's own run then fills whatever a failed process left (a second chance, in this process:
a fault that is not the process's own, such as a bad input, is then raised there as one clear error) and the stage
commits as usual. A shard is computed from its samples' seeds alone, so the artifact equals a one-process run's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from .config import PipelineConfig
from .distributed import child_args, cores_shared, parse_child_args
from .errors import UserError

POLL_S = 2.0


def split_shards(n: int, runs: int) -> list[list[int]]:
    """Shard indices 0..n-1 in contiguous, near-equal groups, one per run (never an empty group)."""
    if n < 1 or runs < 1:
        raise ValueError(f"need at least one shard and one run, got n={n}, runs={runs}")
    k = min(runs, n)
    base, extra = divmod(n, k)
    groups, start = [], 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def command(tmp: str, cfg: PipelineConfig, stage: str, out, inputs: dict, shards: list[int]) -> list[str]:
    return ([sys.executable, "-m", "tlcm_core.shard_processes"] + child_args(tmp, cfg, stage, out, inputs)
            + ["--shards", ",".join(map(str, shards))])


def fill_in_processes(cfg: PipelineConfig, stage: str, inputs: dict, out, missing: list[int], num_shards: int,
                      n: int, reporter) -> list[int]:
    """Fill the `missing` shards (of `num_shards`) of `out` in n processes and wait for them, reporting the done
    shards of all as progress; return the exit codes. The processes are killed if this one is interrupted."""
    from .pairs import shard_marker

    groups = [[missing[j] for j in g] for g in split_shards(len(missing), n)]
    reporter.log(f"{stage}: {len(missing)} shards in {len(groups)} local processes (compute.cpu_processes)")
    env = cores_shared(os.environ, n)
    with tempfile.TemporaryDirectory(prefix="tlcm-shards-") as tmp:
        procs: list[subprocess.Popen] = []
        try:
            for g in groups:
                procs.append(subprocess.Popen(command(tmp, cfg, stage, out, inputs, g), env=env))
            done = -1
            while True:
                codes = [p.poll() for p in procs]
                now = num_shards - len(missing) + sum(out.is_done(shard_marker(i)) for i in missing)
                if now != done:
                    reporter.progress(stage, now, num_shards)
                    done = now
                if all(c is not None for c in codes):
                    break
                try:
                    next(p for p in procs if p.poll() is None).wait(timeout=POLL_S)
                except (subprocess.TimeoutExpired, StopIteration):
                    pass
        except BaseException:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            raise
    for g, p in zip(groups, procs):
        if p.returncode != 0:
            reporter.log(f"{stage}: the process for shards {g[0]}..{g[-1]} exited with code {p.returncode} (its "
                         "log is above); what it left is computed in this process")
    return [p.returncode for p in procs]


def main(argv: list[str] | None = None) -> int:
    from .progress import SilentReporter
    from .stage import StageContext, config_view
    from .stages import REGISTRY

    ap = argparse.ArgumentParser(description="fill some shards of a sharded stage's artifact (no commit)")
    ap.add_argument("--shards", required=True, help="comma-separated shard indices")
    args, cfg, out, inputs = parse_child_args(ap, argv)
    stage = REGISTRY[args.stage]
    shards = [int(s) for s in args.shards.split(",")]
    try:
        stage.run(StageContext(config_view(stage, cfg), inputs, out, SilentReporter(), shards))
    except UserError as e:  # one line: the launching process computes what is left and reports the error itself
        print(f"error: {args.stage} shards {args.shards}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
