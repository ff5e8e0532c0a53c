"""Safety (tests/README.md): no pickle is ever loaded without an explicit opt-in; secrets never reach logs,
manifests, stored objects or Prefect (artifacts, logs, its database); paths from manifests and checkpoint
pointers cannot leave the artifact or the store root."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import S3_KEY, S3_SECRET
from test_faults import MLCD, TRAJ, copy_artifact, fault_config, reference, tiny_teacher_dir

from tlcm_core.pipeline import open_store, plan, run_pipeline
from tlcm_core.progress import SilentReporter
from tlcm_core.store import CorruptArtifactError, StoreError

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("tlcm_core", "flows", "tasks")


# ----------------------------------------------------------------------------------------------------------------
# No pickle loads without an explicit opt-in


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _guarded_by_opt_in(func: ast.AST | None) -> bool:
    """The function refuses to go on unless an `allow_pickle` opt-in is set: `if not ...allow_pickle: raise`."""
    if func is None:
        return False
    for node in ast.walk(func):
        if isinstance(node, ast.If) and isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not) \
                and _dotted(node.test.operand).split(".")[-1] == "allow_pickle" \
                and any(isinstance(n, ast.Raise) for n in node.body):
            return True
    return False


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "cloudpickle.load",
                "cloudpickle.loads", "dill.load", "dill.loads", "joblib.load", "pd.read_pickle", "pandas.read_pickle",
                "marshal.loads", "shelve.open", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load",
                "pickle.Unpickler", "_pickle.loads"}


def pickle_loads_in(path: Path) -> list[str]:
    """Every place in a source file that can unpickle without an explicit opt-in."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def enclosing_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return None

    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
        if name == "torch.load":
            if not _is_true(_kw(node, "weights_only")) and not _guarded_by_opt_in(enclosing_function(node)):
                bad.append(where + " without weights_only=True")
        elif name in UNSAFE_CALLS:
            if not _guarded_by_opt_in(enclosing_function(node)):
                bad.append(where)
        elif name in ("np.load", "numpy.load") and _is_true(_kw(node, "allow_pickle")):
            bad.append(where + " allow_pickle=True")
        elif name == "yaml.load" and "Safe" not in _dotted(_kw(node, "Loader") or ast.Name(id="")):
            bad.append(where + " without a SafeLoader")
        elif name.endswith("from_pretrained") and isinstance(_kw(node, "use_safetensors"), ast.Constant) \
                and _kw(node, "use_safetensors").value is False:
            bad.append(where + " use_safetensors=False")
    return bad


def test_the_scanner_finds_unsafe_loads(tmp_path):
    """The static check below is only worth something if it catches what it is meant to catch."""
    sample = ROOT / "tlcm_core" / f"_scan_sample_{os.getpid()}.py"
    sample.write_text(
        "import pickle, torch, numpy as np, yaml\n"
        "def a(p):\n    return torch.load(p)\n"
        "def b(p):\n    return torch.load(p, weights_only=False)\n"
        "def c(b):\n    return pickle.loads(b)\n"
        "def d(p):\n    return np.load(p, allow_pickle=True)\n"
        "def e(s):\n    return yaml.load(s, Loader=yaml.Loader)\n"
        "def ok(p, allow_pickle):\n    if not allow_pickle:\n        raise ValueError('opt in')\n"
        "    return torch.load(p, weights_only=False)\n"
        "def ok2(p):\n    return torch.load(p, weights_only=True), yaml.load(p, Loader=yaml.SafeLoader)\n")
    try:
        found = pickle_loads_in(sample)
    finally:
        sample.unlink()
    assert [f.split(" ", 1)[0].rsplit(":", 1)[1] for f in found] == ["3", "5", "7", "9", "11"]


def test_no_pickle_load_without_an_explicit_opt_in_anywhere_in_the_code():
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    bad = [hit for f in files for hit in pickle_loads_in(f)]
    assert bad == [], "unpickling without an explicit, checked opt-in:\n" + "\n".join(bad)


def test_prefect_tasks_never_persist_or_reload_pickled_results():
    from prefect.cache_policies import NO_CACHE

    from tasks.stages import stage_task

    assert stage_task.persist_result is False and stage_task.cache_policy in (None, NO_CACHE)


class _Payload:
    """Unpickling this runs code: it creates the file named by `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_holding_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    reference()
    store_dir = tmp_path / "store"
    copy_artifact(TRAJ, store_dir)
    copy_artifact(MLCD, store_dir)
    cfg = fault_config(str(store_dir))
    art = open_store(cfg).artifact(MLCD, plan(cfg)[MLCD].fingerprint)
    for f in ("manifest.json", "lora.safetensors", "train_log.jsonl"):
        os.remove(Path(art.uri) / f)
    latest = art.read_json("checkpoints/latest.json")
    pwned = tmp_path / "pwned"
    evil = pickle.dumps({"optimizer": _Payload(str(pwned)), "step": 6})
    art.write_bytes(f"{latest['dir']}/state.pt", evil)
    latest["sha256"]["state.pt"] = hashlib.sha256(evil).hexdigest()  # an attacker who can write the store
    art.write_json("checkpoints/latest.json", latest)
    with pytest.raises(CorruptArtifactError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    assert "never unpickled" in str(err.value) and art.uri in str(err.value)
    assert not pwned.exists()


def test_a_teacher_with_pickled_weights_carrying_a_payload_is_refused_and_never_runs(tmp_path):
    from tlcm_core.config import TeacherConfig
    from tlcm_core.models import load_unet

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir(), teacher)
    (teacher / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    pwned = tmp_path / "pwned"
    with open(teacher / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": _Payload(str(pwned))}, f)
    with pytest.raises(Exception) as err:
        load_unet(TeacherConfig(source=str(teacher)), torch.device("cpu"))
    chain, e = [], err.value
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    assert "diffusion_pytorch_model.bin" in chain[0]
    assert any("Weights only load failed" in c for c in chain), chain  # refused by the weights-only unpickler
    assert not pwned.exists()


# ----------------------------------------------------------------------------------------------------------------
# Paths from manifests and checkpoint pointers stay inside


def _committed_copy(tmp_path) -> tuple[object, object]:
    reference()
    store_dir = tmp_path / "store"
    copy_artifact(TRAJ, store_dir)
    copy_artifact(MLCD, store_dir)
    cfg = fault_config(str(store_dir))
    return cfg, open_store(cfg).artifact(MLCD, plan(cfg)[MLCD].fingerprint)


@pytest.mark.parametrize("bad", ["../../../outside.bin", "/etc/hostname", "a/../../../x.bin", "..",
                                 "_markers/../../escape"])
def test_a_manifest_listing_a_path_outside_its_artifact_is_corrupt(tmp_path, bad):
    cfg, art = _committed_copy(tmp_path)
    m = json.loads(art.read_bytes("manifest.json"))
    m["files"][bad] = m["files"]["lora.safetensors"]
    (Path(art.uri) / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptArtifactError) as err:
        run_pipeline(cfg, stages=[MLCD], reporter=SilentReporter())
    assert art.uri in str(err.value) and "invalid file path" in str(err.value)


def test_a_checkpoint_pointer_outside_the_artifact_is_refused(tmp_path):
    cfg, art = _committed_copy(tmp_path)
    for f in ("manifest.json", "lora.safetensors", "train_log.jsonl"):
        os.remove(Path(art.uri) / f)
    latest = art.read_json("checkpoints/latest.json")
    outside = tmp_path / "outside" / "ckpt"  # a valid-looking checkpoint, but not in this artifact
    shutil.copytree(Path(art.uri) / latest["dir"], outside)
    rel = os.path.relpath(outside, art.uri)
    assert rel.startswith("..")
    art.write_json("checkpoints/latest.json", dict(latest, dir=rel))
    with pytest.raises(StoreError, match=r"must not contain '\.\.'"):
        run_pipeline(cfg, reporter=SilentReporter())


def test_a_link_out_of_the_artifact_is_refused(tmp_path):
    cfg, art = _committed_copy(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(Path(art.uri) / "lora.safetensors", outside)
    (Path(art.uri) / "lora.safetensors").unlink()
    os.symlink(outside, Path(art.uri) / "lora.safetensors")  # same bytes, but read from outside the store
    with pytest.raises(CorruptArtifactError) as err:
        run_pipeline(cfg, stages=[MLCD], reporter=SilentReporter())
    assert "symbolic link" in str(err.value) and "lora.safetensors" in str(err.value)


def test_artifact_uris_from_outside_the_store_are_refused(tmp_path):
    cfg, art = _committed_copy(tmp_path)
    store = open_store(cfg)
    assert store.open_uri(art.uri) == art
    for uri in [art.uri + "/../../../elsewhere/mlcd/0", str(tmp_path / "other" / "mlcd" / art.fingerprint),
                "s3://elsewhere/mlcd/" + art.fingerprint]:
        with pytest.raises(StoreError):
            store.open_uri(uri)


# ----------------------------------------------------------------------------------------------------------------
# Secrets


SECRETS_RUN = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
for name in ("tlcm", "tlcm.store", "prefect.flow_runs", "prefect.task_runs", "s3fs"):
    logging.getLogger(name).setLevel(logging.DEBUG)
from flows.tlcm import tlcm
from tlcm_core.config import validate_config

cfg = json.loads(sys.argv[1])
ok = tlcm(config=cfg)                                         # every stage, computed, on the S3 store
again = tlcm(config=cfg)                                      # cache hits
bad = dict(cfg, store=dict(cfg["store"], url="s3://no-such-bucket-tlcm/x"))
failed = tlcm(config=bad, stages=["teacher-trajectories"], return_state=True)   # a failing run and its traceback

from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogHandler
APILogHandler().flush()
with get_client(sync_client=True) as client:
    artifacts = [a.model_dump(mode="json") for a in client.read_artifacts()]
    logs = [l.model_dump(mode="json") for l in client.read_logs()]
    runs = [r.model_dump(mode="json") for r in client.read_flow_runs()]
print("RESULT " + json.dumps({"ok": ok, "again": [r["cached"] for r in again], "failed": failed.type.value,
                              "artifacts": artifacts, "logs": logs, "runs": runs}))
"""


def test_secrets_never_reach_logs_manifests_stored_objects_or_prefect(s3_endpoint, tmp_path):
    """The whole flow (Prefect, ephemeral server with its own PREFECT_HOME) on S3 with credentials from the
    environment, logging at DEBUG; then every place something is written is searched for the secret."""
    import fsspec

    if not s3_endpoint.running:
        s3_endpoint.start()
    bucket = s3_endpoint.make_bucket()
    cfg = fault_config(f"s3://{bucket}/artifacts").model_dump(mode="json")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(s3_endpoint.env, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="DEBUG", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SECRETS_RUN, json.dumps(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:  # the run and anything it started (Prefect's temporary server) go, whatever happened
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert [x["stage"] for x in out["ok"]] == [TRAJ, MLCD] and out["again"] == [True, True]
    assert out["failed"] == "FAILED" and out["artifacts"] and out["logs"]
    assert any(S3_KEY in v for v in env.values())  # the credentials were really in use...

    places = {"stdout": r.stdout, "stderr (DEBUG logging)": r.stderr,
              "prefect artifacts": json.dumps(out["artifacts"]), "prefect logs": json.dumps(out["logs"]),
              "prefect flow runs and parameters": json.dumps(out["runs"])}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_endpoint.storage_options)
    objects = fs.find(bucket)
    assert any(o.endswith("/manifest.json") for o in objects) and any(o.endswith(".safetensors") for o in objects)
    for o in objects:  # manifests, chunks, LoRAs, markers, checkpoints, logs
        places[f"s3://{o}"] = fs.cat_file(o).decode("latin-1")
    for f in home.rglob("*"):  # Prefect's database and anything else it kept
        if f.is_file():
            places[str(f)] = f.read_bytes().decode("latin-1")
    assert any("prefect.db" in p for p in places)
    for secret in (S3_SECRET,):
        leaked = [where for where, text in places.items() if secret in text]
        assert leaked == [], f"the secret leaked into {leaked}"
    # the failing run said what was wrong, naming the store but not the credentials
    assert "no-such-bucket-tlcm" in r.stderr + json.dumps(out["logs"])
