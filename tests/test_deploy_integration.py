"""The deployment path end to end on one machine, as a new user would run it.

`tlcm stack up --s3 --workers 2` starts a real Prefect server (SQLite, loopback, no UI), a process work pool
with two workers and a local S3 endpoint (moto, server mode); `prefect deploy` reads deploy/prefect.yaml;
`prefect deployment run tlcm/full-distill --watch` runs a tiny pipeline with `dispatch=deployments` and the
store on the bucket. Then: a second run is all cache hits, `tlcm/mlcd` with another learning rate recomputes
MLCD from the cached trajectories, nothing secret reached Prefect, and `tlcm stack down` leaves no process.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_deploy_integration.py -m integration -x -s
(-s prints how long each phase took).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import S3_KEY, S3_SECRET

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = f"tlcm-it-{uuid.uuid4().hex[:8]}"
STORE = f"s3://{BUCKET}/run"
STAGES = ["teacher-trajectories", "mlcd", "teacher-evaluate", "evaluate"]  # teacher-evaluate: implied by evaluate


def overrides(teacher: str, *extra: str) -> list[str]:
    return [f"teacher.source={teacher}", "stages=[teacher-trajectories,mlcd,evaluate]", "trajectories.num_samples=64", "trajectories.shard_size=16",
            "trajectories.batch_size=16", "shard_runs=2", "mlcd.iterations=4", "mlcd.batch_size=8",
            "evaluate.num_samples=8", "evaluate.steps=[1,2]", "evaluate.teacher_steps=[2]", "evaluate.batch_size=8",
            "lora.rank=4", "dispatch=deployments", *extra]


@dataclass
class Stack:
    env: dict[str, str]
    state_dir: Path
    api_url: str
    s3_url: str
    teacher: str
    timings: dict[str, float] = field(default_factory=dict)
    runs: dict[str, object] = field(default_factory=dict)

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def run(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def deployment_run(self, deployment: str, *extra: str) -> subprocess.Popen:
        """`prefect deployment run DEPLOYMENT --watch` with config, store and overrides as a user types them."""
        cmd = [str(BIN / "prefect"), "deployment", "run", deployment, "--watch", "--watch-interval", "1",
               "--param", "config=toy-fast", "--param", f"store={STORE}",
               "--param", f"overrides={json.dumps(overrides(self.teacher, *extra))}"]
        return subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def store(self):
        from tlcm_core.store import ArtifactStore

        return ArtifactStore(STORE, storage_options={"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": self.s3_url})

    def plan(self, *extra: str):
        from flows.tlcm import resolve_config
        from tlcm_core.pipeline import plan

        return plan(resolve_config("toy-fast", STORE, overrides(self.teacher, *extra)))


def _finish(proc: subprocess.Popen, what: str, timeout: float = 600) -> tuple[str, str]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-4000:]}"
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, f"no flow run id in the output of {what}:\n{out[-2000:]}"
    return m.group(1), out


def _stack_pids(state_dir: Path) -> list[int]:
    """Every process the stack started, with its descendants (flow runs live in sessions of their own)."""
    import psutil

    record = json.loads((state_dir / "stack.json").read_text())
    pids = []
    for svc in record["services"]:
        try:
            p = psutil.Process(svc["pid"])
            pids += [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.Error:
            pass
    return pids


def _alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
        TLCM_CACHE=str(root / "cache"),
        # the workers' S3 credentials: from their environment only (the stack points them at its endpoint)
        AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET,
    )
    t0 = time.monotonic()
    teacher = root / "tiny-sdxl"  # workers share this machine, so a local teacher folder works
    build = subprocess.Popen([sys.executable, "-c", "import sys; from tlcm_core.toy.pipeline import build_toy_pipeline; "
                              "build_toy_pipeline(seed=3).save_pretrained(sys.argv[1])", str(teacher)],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state_dir = root / "stack"
    up = subprocess.run([sys.executable, "-m", "flows.cli", "stack", "up", "--state-dir", str(state_dir), "--port", "0",
                         "--workers", "2", "--s3", "--bucket", BUCKET, "--no-ui"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, f"tlcm stack up failed:\n{up.stdout}\n{up.stderr}"
        record = json.loads((state_dir / "stack.json").read_text())
        s3 = next(s for s in record["services"] if s["name"] == "s3")
        st = Stack(dict(env, PREFECT_API_URL=record["api_url"]), state_dir, record["api_url"], s3["url"], str(teacher))
        st.timings["stack up"] = time.monotonic() - t0
        _, err = build.communicate(timeout=300)
        assert build.returncode == 0, f"building the tiny teacher failed:\n{err[-3000:]}"
        yield st
    finally:
        if build.poll() is None:
            build.kill()
        if (state_dir / "stack.json").exists():  # a failed test left it up
            subprocess.run([sys.executable, "-m", "flows.cli", "stack", "down", "--state-dir", str(state_dir)],
                           env=env, cwd=REPO, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def deployed(stack):
    t0 = time.monotonic()
    r = stack.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    assert r.returncode == 0, f"prefect deploy failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    stack.timings["deploy"] = time.monotonic() - t0
    with stack.client() as c:
        names = {d.name for d in c.read_deployments()}
    assert {"full-distill", "teacher-trajectories", "latent-lpips", "mlcd", "lcd-trajectories", "lcd", "finetune",
            "teacher-evaluate", "evaluate", "export", "toy-teacher"} <= names
    return stack


@pytest.fixture(scope="module")
def first_run(deployed):
    t0 = time.monotonic()
    run_id, _ = _finish(deployed.deployment_run("tlcm/full-distill"), "the first full-distill run")
    deployed.timings["first full-distill run"] = time.monotonic() - t0
    return run_id


@pytest.fixture(scope="module")
def reruns(deployed, first_run):
    """A second full-distill run and a run of tlcm/mlcd with another learning rate, at the same time."""
    t0 = time.monotonic()
    second = deployed.deployment_run("tlcm/full-distill")
    mlcd = deployed.deployment_run("tlcm/mlcd", "mlcd.lr=2e-4")
    second_id, _ = _finish(second, "the second full-distill run")
    mlcd_id, _ = _finish(mlcd, "the tlcm/mlcd run with mlcd.lr=2e-4")
    deployed.timings["second full-distill + mlcd re-run (concurrent)"] = time.monotonic() - t0
    return second_id, mlcd_id


def _runs(client, **filters):
    from prefect.client.schemas.filters import FlowRunFilter

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(**filters), limit=200)


def _subflows(client, parent_id: str):
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

    return _runs(client, parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(parent_id)]))


def _artifacts(client, run_ids) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(run_ids))),
                                 limit=200)


def _by_key(artifacts, key: str) -> list:
    return [a for a in artifacts if a.key == key]


def test_full_distill_runs_each_stage_as_its_own_deployment_run(deployed, first_run):
    with deployed.client() as c:
        parent = c.read_flow_run(uuid.UUID(first_run))
        assert parent.state.type.value == "COMPLETED" and parent.state.name == "Completed"
        deployments = {d.id: d.name for d in c.read_deployments()}
        assert deployments[parent.deployment_id] == "full-distill"
        subs = _subflows(c, first_run)
    by_stage: dict[str, list] = {}
    for r in subs:
        assert r.state.type.value == "COMPLETED", f"{r.name} ended {r.state.name}"
        stage = deployments[r.deployment_id]
        assert r.parameters["stages"] == [stage] and r.parameters["dispatch"] == "local"
        by_stage.setdefault(stage, []).append(r)
    assert sorted(by_stage) == sorted(STAGES), by_stage.keys()
    assert len(by_stage["mlcd"]) == 1 and len(by_stage["teacher-evaluate"]) == 1 and len(by_stage["evaluate"]) == 1
    # shard_runs=2: 4 shards split over two runs with `shards`, then one final run without shards commits
    traj = by_stage["teacher-trajectories"]
    assert sorted(str(r.parameters.get("shards")) for r in traj) == ["None", "[0, 1]", "[2, 3]"]
    final = next(r for r in traj if r.parameters.get("shards") is None)
    assert all(r.end_time <= final.start_time for r in traj if r is not final)
    # stages ran in order, each after the one it reads
    assert final.end_time <= by_stage["mlcd"][0].start_time <= by_stage["mlcd"][0].end_time \
        <= by_stage["evaluate"][0].start_time
    assert by_stage["teacher-evaluate"][0].end_time <= by_stage["evaluate"][0].start_time
    # every artifact's manifest is in the bucket and verifies
    p = deployed.plan()
    store = deployed.store()
    created = {}
    for s in STAGES:
        m = store.artifact(s, p[s].fingerprint).manifest(verify="checksum")
        assert m.stage == s and m.files
        created[s] = m.created
    deployed.runs["first"] = {"parent": parent, "subflows": subs, "by_stage": by_stage, "created": created}


def test_progress_tables_grids_and_links_reach_the_prefect_ui(deployed, first_run):
    first = deployed.runs["first"]
    by_stage = first["by_stage"]
    p = deployed.plan()
    store = deployed.store()
    with deployed.client() as c:
        arts = {s: _artifacts(c, [r.id for r in runs]) for s, runs in by_stage.items()}
        parent_arts = _artifacts(c, [first["parent"].id])
    # per-stage progress, updated while the work ran (created below 100 %, ended at 100 %)
    for s, key in (("teacher-trajectories", "progress-teacher-trajectories"), ("mlcd", "progress-mlcd")):
        progress = _by_key(arts[s], key)
        assert progress and all(a.type == "progress" and float(a.data) == 100.0 for a in progress), (s, progress)
    assert any(a.type == "progress" and a.key.startswith("progress-evaluate") for a in arts["evaluate"])
    # the loss table
    (loss,) = _by_key(arts["mlcd"], "mlcd-loss")
    rows = json.loads(loss.data) if isinstance(loss.data, str) else loss.data
    assert loss.type == "table" and rows and all("loss" in r and "step" in r for r in rows)
    # sample grids: markdown with an embedded PNG
    grids = [a for a in arts["evaluate"] if a.key and a.key.startswith("grid-")]
    assert len(grids) == 3  # teacher@2, student@1, student@2
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", grids[0].data).group(1))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # the final metrics table: on the evaluate run and on the full-distill run
    for where in (arts["evaluate"], parent_arts):
        (metrics,) = _by_key(where, "metrics")
        rows = json.loads(metrics.data) if isinstance(metrics.data, str) else metrics.data
        assert {(r["method"], r["steps"]) for r in rows} == {("teacher-ddim-cfg", 2), ("tlcm-renoise", 1),
                                                            ("tlcm-renoise", 2)}
    # links to the artifact URIs, and the stage table on the full-distill run
    for s in STAGES:
        uri = store.artifact(s, p[s].fingerprint).uri
        assert any(uri in a.data for a in _by_key(arts[s], f"artifact-{s}")), s
    (table,) = _by_key(parent_arts, "tlcm-stages")
    for s in STAGES:
        assert f"| {s} | no | `{store.artifact(s, p[s].fingerprint).uri}` |" in table.data


def test_second_run_is_all_cache_hits(deployed, reruns):
    second_id, _ = reruns
    with deployed.client() as c:
        run = c.read_flow_run(uuid.UUID(second_id))
        subs = _subflows(c, second_id)
        arts = _artifacts(c, [run.id])
    assert run.state.type.value == "COMPLETED" and run.state.name == "Cached", run.state
    assert subs == []  # complete artifacts are verified by the dispatcher, not sent to a worker
    (table,) = _by_key(arts, "tlcm-stages")
    assert all(f"| {s} | yes |" in table.data for s in STAGES), table.data
    assert _by_key(arts, "metrics"), "a cache-hit run still shows the final metrics table"


def test_mlcd_rerun_recomputes_mlcd_from_cached_trajectories(deployed, reruns):
    _, mlcd_id = reruns
    first = deployed.runs["first"]
    store = deployed.store()
    old, new = deployed.plan(), deployed.plan("mlcd.lr=2e-4")
    assert new["teacher-trajectories"].fingerprint == old["teacher-trajectories"].fingerprint
    assert new["mlcd"].fingerprint != old["mlcd"].fingerprint
    with deployed.client() as c:
        run = c.read_flow_run(uuid.UUID(mlcd_id))
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

        tasks = c.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
        deployments = {d.id: d.name for d in c.read_deployments()}
        traj_runs = [r for r in _runs(c) if deployments.get(r.deployment_id) == "teacher-trajectories"]
    assert deployments[run.deployment_id] == "mlcd" and run.state.name == "Completed", run.state
    assert [(t.name, t.state.name) for t in tasks] == [("mlcd", "Completed")]  # computed, not "Cached"
    assert store.artifact("mlcd", new["mlcd"].fingerprint).manifest(verify="checksum").summary
    # the trajectories were read, not recomputed: no new trajectory run, one artifact, its manifest untouched
    assert {r.id for r in traj_runs} == {r.id for r in first["by_stage"]["teacher-trajectories"]}
    assert len(store.fs.ls(f"{BUCKET}/run/teacher-trajectories")) == 1
    traj = store.artifact("teacher-trajectories", old["teacher-trajectories"].fingerprint).manifest()
    assert traj.created == first["created"]["teacher-trajectories"]


def test_no_secret_reaches_prefect(deployed, reruns):
    import psutil

    # the secret is really where it belongs: in the workers' environment
    record = json.loads((deployed.state_dir / "stack.json").read_text())
    workers = [s for s in record["services"] if "worker" in s["name"]]
    assert len(workers) == 2
    for w in workers:
        assert psutil.Process(w["pid"]).environ().get("AWS_SECRET_ACCESS_KEY") == S3_SECRET
    with deployed.client() as c:
        runs = _runs(c)
        texts = [r.model_dump_json() for r in runs]  # parameters, job variables, state messages
        texts += [d.model_dump_json() for d in c.read_deployments()]
        offset = 0
        while batch := c.read_logs(limit=200, offset=offset):
            texts += [log.message for log in batch]
            offset += len(batch)
        arts = c.read_artifacts(limit=200)
        texts += [a.model_dump_json() for a in arts]
    assert len(runs) >= 8 and offset > 50 and len(arts) > 20  # there was plenty to leak into
    leaks = [t[:200] for t in texts if S3_SECRET in t]
    assert not leaks, f"the S3 secret leaked into Prefect: {leaks}"
    for log in (deployed.state_dir / "logs").glob("*.log"):  # worker output streams the flow runs' stdout
        assert S3_SECRET not in log.read_text(errors="replace"), log


def test_stack_down_leaves_no_process(deployed, reruns):
    pids = _stack_pids(deployed.state_dir)
    assert len(pids) >= 4  # server, S3 endpoint, two workers
    t0 = time.monotonic()
    r = deployed.run(sys.executable, "-m", "flows.cli", "stack", "down", "--state-dir", str(deployed.state_dir))
    assert r.returncode == 0, r.stderr
    deployed.timings["stack down"] = time.monotonic() - t0
    assert _alive(pids) == []
    assert not (deployed.state_dir / "stack.json").exists()
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in deployed.timings.items()))
