"""dispatch=deployments without a server (run_deployment faked over a real local store), the flow's `Cached`
state in process, the toy-teacher flow's publishing to S3, and `tlcm stack`'s process handling."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Failed, Running

import flows.dispatch as dispatch
from flows.dispatch import StageRunFailed, run_stages_as_deployments, split_shards
from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, plan

# ------------------------------------------------------------------------------------------------ split_shards


@pytest.mark.parametrize("n,runs", [(4, 2), (5, 2), (7, 3), (3, 8), (1, 1), (10, 1)])
def test_split_shards_covers_every_shard_once_in_contiguous_groups(n, runs):
    groups = split_shards(n, runs)
    assert len(groups) == min(n, runs) and all(groups)
    assert [i for g in groups for i in g] == list(range(n))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_split_shards_refuses_nothing_to_split():
    with pytest.raises(ValueError):
        split_shards(0, 2)


# ------------------------------------------------------------------------------------------------ dispatcher


def _cfg(tmp_path, *extra: str):
    # a teacher that is never loaded: the fake stage runs below only write store files
    return load_config("toy-fast", [f"store.url={tmp_path / 'store'}", "teacher.source=/nonexistent/teacher",
                                    "trajectories.num_samples=64", "trajectories.shard_size=16", "shard_runs=2",
                                    "dispatch=deployments", *extra])


class FakeDeployments:
    """Stands in for run_deployment + the API: each 'run' does what the stage run would do to the store."""

    def __init__(self, cfg, outcome=None, running_polls: int = 0):
        self.cfg, self.p, self.store = cfg, plan(cfg), open_store(cfg)
        self.calls: list[dict] = []
        self.runs: dict[uuid.UUID, FlowRun] = {}
        self.outcome = outcome or (lambda call: None)  # call -> a state overriding Completed(), or None
        self.running_polls = running_polls  # polls a run stays Running before it does its work
        self.pending: dict[uuid.UUID, tuple[dict, int]] = {}

    def art(self, stage):
        return self.store.artifact(stage, self.p[stage].fingerprint)

    def work(self, call) -> FlowRun:
        stage, shards = call["stage"], call["parameters"]["shards"]
        art = self.art(stage)
        state = self.outcome(call)
        if state is None or state.is_completed():
            if call["parameters"]["force"] and art.exists():
                art.discard()
            if shards is not None:
                art.mark_done("text")
                for i in shards:
                    art.mark_done(f"shard-{i:05d}")
            elif not art.exists():
                art.write_json("data.json", {"stage": stage})
                summary = {"rows": [{"method": "tlcm-renoise", "steps": 1}]} if stage == "evaluate" else {}
                art.commit(version=1, config={}, inputs={}, summary=summary)
        run = self.runs[call["id"]]
        return run.model_copy(update={"state": state or Completed()})

    def run_deployment(self, name, parameters, timeout, as_subflow, flow_run_name):
        assert timeout == 0 and as_subflow
        flow, stage = name.split("/")
        call = {"id": uuid.uuid4(), "stage": stage, "parameters": parameters, "name": flow_run_name,
                "text_done_at_start": self.art(stage).is_done("text")}
        self.calls.append(call)
        self.runs[call["id"]] = FlowRun(id=call["id"], name=flow_run_name, flow_id=uuid.uuid4(), state=Running())
        if self.running_polls:
            self.pending[call["id"]] = (call, self.running_polls)
            return self.runs[call["id"]]
        self.runs[call["id"]] = self.work(call)
        return self.runs[call["id"]]

    def read_flow_run(self, rid):
        if rid in self.pending:
            call, left = self.pending[rid]
            if left > 1:
                self.pending[rid] = (call, left - 1)
                return self.runs[rid]
            del self.pending[rid]
            self.runs[rid] = self.work(call)
        return self.runs[rid]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake(monkeypatch, tmp_path):
    def make(*extra, **kw):
        f = FakeDeployments(_cfg(tmp_path, *extra), **kw)
        monkeypatch.setattr(dispatch, "run_deployment", f.run_deployment)
        monkeypatch.setattr(dispatch, "get_client", lambda sync_client: f)
        monkeypatch.setattr(dispatch, "get_run_logger", lambda: logging.getLogger("test"))
        return f

    return make


def _dispatch(f, stages=("teacher-trajectories", "mlcd", "evaluate"), forced=()):
    return run_stages_as_deployments(f.cfg.model_dump(mode="json"), list(stages), set(forced), poll_s=0.01)


def test_each_stage_is_its_own_run_and_trajectory_shards_fan_out(fake):
    f = fake()
    results = _dispatch(f)
    assert [(c["stage"], c["parameters"]["shards"]) for c in f.calls] == [
        ("teacher-trajectories", [0, 1]), ("teacher-trajectories", [2, 3]), ("teacher-trajectories", None),
        ("mlcd", None), ("evaluate", None)]
    for c in f.calls:  # a dispatched stage runs in process: it never dispatches again
        assert c["parameters"]["stages"] == [c["stage"]] and c["parameters"]["dispatch"] == "local"
        assert c["parameters"]["config"]["dispatch"] == "local" and c["parameters"]["force"] is None
    assert [(r["stage"], r["cached"], len(r["flow_run"])) for r in results] == [
        ("teacher-trajectories", False, 3), ("mlcd", False, 1), ("evaluate", False, 1)]
    assert results[2]["summary"]["rows"] and results[1]["uri"] == f.art("mlcd").uri


def test_shard_runs_start_together(fake):
    # the text conditioning is written idempotently (tests/test_stage1.py runs two shard workers at once), so no
    # shard run waits for another's set-up
    f = fake(running_polls=3)  # the first shard run needs a few polls before it writes anything
    _dispatch(f, stages=["teacher-trajectories"])
    shard_calls = [c for c in f.calls if c["parameters"]["shards"] is not None]
    assert [c["text_done_at_start"] for c in shard_calls] == [False, False]


def test_complete_artifacts_are_cache_hits_and_not_dispatched(fake):
    f = fake()
    _dispatch(f)
    n = len(f.calls)
    again = _dispatch(f)
    assert len(f.calls) == n
    assert [r["cached"] for r in again] == [True, True, True] and all(r["flow_run"] == [] for r in again)


def test_a_run_that_finds_its_stage_complete_reports_a_cache_hit(fake):
    # e.g. another pipeline committed the same artifact between the check here and the run on the worker
    f = fake(outcome=lambda call: Completed(name="Cached") if call["stage"] == "mlcd" else None)
    results = _dispatch(f)
    assert [r["cached"] for r in results] == [False, True, False]


def test_a_failed_stage_run_stops_the_pipeline_with_its_name(fake):
    f = fake(outcome=lambda call: Failed(message="CUDA out of memory") if call["stage"] == "mlcd" else None)
    with pytest.raises(StageRunFailed, match="stage mlcd: deployment run .*mlcd.* ended Failed: CUDA out of memory"):
        _dispatch(f)
    assert [c["stage"] for c in f.calls][-1] == "mlcd"  # evaluate never started


def test_a_failed_shard_run_leaves_its_gap_to_the_final_run(fake):
    f = fake(outcome=lambda call: Failed() if call["parameters"]["shards"] == [2, 3] else None)
    (traj,) = _dispatch(f, stages=["teacher-trajectories"])
    assert not traj["cached"] and len(traj["flow_run"]) == 3 and f.art("teacher-trajectories").exists()


def test_force_on_a_fanned_out_stage_discards_once_then_fills(fake):
    f = fake()
    _dispatch(f, stages=["teacher-trajectories"])
    first = f.art("teacher-trajectories").manifest().created
    f.calls.clear()
    (traj,) = _dispatch(f, stages=["teacher-trajectories"], forced={"teacher-trajectories"})
    # discarded here, so no shard run gets force=True (it would discard its siblings' shards)
    assert [c["parameters"]["force"] for c in f.calls] == [None, None, None]
    assert not traj["cached"] and f.art("teacher-trajectories").manifest().created > first


def test_shard_runs_1_keeps_the_stage_in_one_run(fake):
    f = fake("shard_runs=1")
    _dispatch(f, stages=["teacher-trajectories", "mlcd"], forced={"mlcd"})
    assert [(c["stage"], c["parameters"]["shards"], c["parameters"]["force"]) for c in f.calls] == [
        ("teacher-trajectories", None, None), ("mlcd", None, ["mlcd"])]


# ------------------------------------------------------------------------------------------------ the flow in process


@pytest.mark.parametrize("name,message", [("mlcdd", "unknown stage"), ("lcd", "not part of this config's pipeline"),
                                          ("mlcd", None)])
def test_a_stage_deployment_never_completes_having_done_nothing(tmp_path, name, message):
    """A stage deployment asked for a stage the pipeline does not plan fails at once (plan_run, the front door every
    entry point shares) rather than completing having done nothing."""
    from tlcm_core.pipeline import PlanError, plan_run

    cfg = _cfg(tmp_path)
    if message is None:
        assert plan_run(cfg, [name], access="none").todo == [name]
    else:
        with pytest.raises(PlanError, match=message):
            plan_run(cfg, [name], access="none")
    with pytest.raises(PlanError, match="not part of this config's pipeline"):
        plan_run(_cfg(tmp_path, "stages=[teacher-trajectories,mlcd]"), ["evaluate"], access="none")
    with pytest.raises(PlanError, match="not part of this config's pipeline"):
        plan_run(_cfg(tmp_path, "stages=[teacher-trajectories,mlcd]"), force=["lcd"], access="none")


FLOW_SCRIPT = """
import json, sys
import flows  # first, as the CLI does: gives Prefect's temporary server a slow machine's start-up budget
from prefect import task
from prefect.states import Completed
import flows.tlcm as tlcm_flow

@task(name="stage", task_run_name="{stage}")
def cached_stage(stage, config, force=False, bars=False, shards=None):
    summary = {"rows": [{"method": "tlcm-renoise", "steps": 1, "accuracy": 0.5}]} if stage == "evaluate" else {}
    return Completed(data={"stage": stage, "uri": "/store/" + stage, "fingerprint": "f", "cached": True,
                           "summary": summary}, name="Cached")

published = []
tlcm_flow.stage_task = cached_stage
tlcm_flow.PrefectReporter.table = lambda self, key, rows, description="": published.append(key)
state = tlcm_flow.tlcm(config=json.loads(sys.argv[1]), stages=["mlcd", "evaluate"], return_state=True)
print(json.dumps({"type": state.type.value, "name": state.name, "result": state.result(),
                  "called": tlcm_flow.tlcm(config=json.loads(sys.argv[1]), stages=["mlcd"]),
                  "published": published}))
"""


def test_flow_in_process_ends_cached_and_still_returns_its_results(tmp_path):
    """A run whose stages were all cache hits ends in a Completed state named Cached; calling the flow still
    returns the list of results (the CLI relies on it) and the run publishes the metrics table.
    (A subprocess, so that its ephemeral Prefect gets a PREFECT_HOME of its own.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cfg = _cfg(tmp_path, "dispatch=local").model_dump(mode="json")
    r = subprocess.run([sys.executable, "-c", FLOW_SCRIPT, json.dumps(cfg)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["type"], out["name"]) == ("COMPLETED", "Cached")
    assert [(x["stage"], x["cached"]) for x in out["result"]] == [("mlcd", True), ("evaluate", True)]
    assert [x["stage"] for x in out["called"]] == ["mlcd"]
    assert out["published"] == ["metrics"]  # evaluate was a cache hit: the run still shows the metrics


# ------------------------------------------------------------------------------------------------ toy-teacher flow


def test_toy_teacher_trains_locally_and_publishes_the_pipeline_folder_to_s3(s3_store):
    from flows.toy_teacher import train_and_publish

    bucket = s3_store.url.split("/")[2]
    out = f"s3://{bucket}/teachers/toy"
    seen = []
    url = train_and_publish({"n_train": 16, "vae_steps": 1, "unet_steps": 1, "scale_samples": 16,
                             "vae_batch_size": 4, "unet_batch_size": 4}, out,
                            progress=lambda phase, step, total, metrics: seen.append(phase))
    assert url == f"{out}/pipeline" and {"vae", "unet"} <= set(seen)
    files = {p.split("/pipeline/", 1)[1] for p in s3_store.fs.find(f"{bucket}/teachers/toy/pipeline")}
    assert "model_index.json" in files
    assert {f.split("/")[0] for f in files} >= {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                "tokenizer_2", "scheduler"}


# ------------------------------------------------------------------------------------------------ tlcm stack


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "parent":  # like a worker: its flow run lives in a session of its own
    child = subprocess.Popen([sys.executable, __file__, "child"], start_new_session=True)
    print(child.pid, flush=True)
time.sleep(120)
"""


def test_stack_stop_kills_ignoring_services_and_their_own_session_children(tmp_path):
    from flows.stack import _alive, _create_time, _stop

    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    proc = subprocess.Popen([sys.executable, str(script), "parent"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    assert os.getpgid(child) != proc.pid
    svc = {"name": "worker", "pid": proc.pid, "pgid": proc.pid, "started": _create_time(proc.pid)}
    assert _alive(svc)
    t0 = time.monotonic()
    assert _stop([svc], grace_s=0.5) == ["worker"]
    assert time.monotonic() - t0 < 8
    proc.wait(timeout=5)
    assert not _alive(svc)
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the child was re-parented to init, which reaps it
            os.kill(child, 0)
            time.sleep(0.1)


def test_stack_never_signals_a_recycled_pid(tmp_path):
    from flows.stack import _alive, _stop

    me = {"name": "worker", "pid": os.getpid(), "pgid": os.getpgrp(), "started": 12345.0}  # another start time
    assert not _alive(me)
    assert _stop([me], grace_s=0.1) == []


def test_stack_status_and_down_without_a_stack(tmp_path, capsys):
    from flows.cli import main

    assert main(["stack", "status", "--state-dir", str(tmp_path)]) == 1
    assert main(["stack", "down", "--state-dir", str(tmp_path)]) == 0
    assert "no stack" in capsys.readouterr().out


def test_stack_up_refuses_a_busy_port(tmp_path, capsys):
    import socket

    from flows.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["stack", "up", "--state-dir", str(tmp_path), "--port", str(port), "--workers", "0"]) == 1
    assert f"port {port}" in capsys.readouterr().err
    assert not (tmp_path / "stack.json").exists()



def test_prefect_yaml_parses_and_declares_every_stage():
    """A YAML slip in deploy/prefect.yaml makes `prefect deploy` skip the file: catch it without a server."""
    import yaml

    from tlcm_core.config import STAGES

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "prefect.yaml").read_text())
    names = {d["name"] for d in doc["deployments"]}
    assert {"full-distill", "toy-teacher", *STAGES} <= names
    for d in doc["deployments"]:
        assert d["entrypoint"] in ("flows.tlcm:tlcm", "flows.toy_teacher:toy_teacher"), d
        if d["name"] in STAGES:
            assert d["parameters"]["stages"] == [d["name"]] and d["parameters"]["dispatch"] == "local"
