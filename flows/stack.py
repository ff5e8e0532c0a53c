"""`tlcm stack up|down|status`: the deployment path on one machine.

`up` starts a Prefect server (SQLite under the state folder), a process work pool, N workers and, with
`--s3`, a local S3 endpoint (moto in server mode) with a bucket. Every service runs in its own session
(process group) with its log in `STATE/logs/`; `STATE/stack.json` records pids and start times, so `down`
stops exactly what `up` started: SIGTERM to each process group (and to the flow-run processes a worker
started in sessions of their own), SIGKILL after 10 s.

`STATE/env` (mode 600) holds the variables a shell needs to use the stack (`source STATE/env`):
PREFECT_API_URL and, with `--s3`, the endpoint and the credentials the workers got. Nothing here prints a
secret.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("TLCM_STACK_DIR") or Path.home() / ".cache" / "tlcm" / "stack")
STATE_FILE = "stack.json"
ENV_FILE = "env"
STOP_GRACE_S = 10.0


# ---------------------------------------------------------------------------------------------------- helpers


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _bin(name: str) -> str:
    """A console script of this environment (prefect), next to the running interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(svc: dict) -> bool:
    """The recorded process still runs (same pid *and* start time: a recycled pid is not ours)."""
    import psutil

    try:
        p = psutil.Process(svc["pid"])
        return abs(p.create_time() - svc["started"]) < 0.5 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class StackError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- state


class StackState:
    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir).expanduser().resolve()
        self.file = self.dir / STATE_FILE
        self.logs = self.dir / "logs"
        self.prefect_home = self.dir / "prefect-home"
        self.env_file = self.dir / ENV_FILE

    def load(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.file)

    def write_env(self, variables: dict[str, str]) -> None:
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# tlcm stack: `source` this file to use the stack from a shell\n")
            for k, v in variables.items():
                f.write(f"export {k}={shlex.quote(v)}\n")
        os.chmod(self.env_file, 0o600)


def _start(state: StackState, name: str, cmd: list[str], env: dict[str, str], url: str | None = None) -> dict:
    state.logs.mkdir(parents=True, exist_ok=True)
    log = state.logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=state.dir, start_new_session=True)
    return {"name": name, "pid": proc.pid, "pgid": proc.pid, "started": _create_time(proc.pid) or time.time(),
            "cmd": cmd, "log": str(log), "url": url}


def _wait_until(check, svc: dict, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not _alive(svc):
            raise StackError(f"{svc['name']} exited while starting; last lines of {svc['log']}:\n{_tail(svc['log'])}")
        time.sleep(0.3)
    raise StackError(f"{svc['name']}: {what} not ready after {timeout:.0f} s; see {svc['log']}:\n{_tail(svc['log'])}")


# ---------------------------------------------------------------------------------------------------- stop


def _stop(services: list[dict], grace_s: float = STOP_GRACE_S) -> list[str]:
    """SIGTERM each service's process group and those of its descendants; SIGKILL what is left after grace_s."""
    import psutil

    procs: list[psutil.Process] = []
    groups: set[int] = set()
    stopped = []
    for svc in services:
        if not _alive(svc):
            continue
        try:
            leader = psutil.Process(svc["pid"])
            family = [leader] + leader.children(recursive=True)
        except psutil.Error:
            continue
        stopped.append(svc["name"])
        groups.add(svc["pgid"])
        for p in family:
            procs.append(p)
            try:
                groups.add(os.getpgid(p.pid))  # a worker's flow runs live in sessions of their own
            except OSError:
                pass
    groups.discard(os.getpgrp())  # never signal our own group
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        procs = _wait_gone(procs, wait_s)
        if not procs:
            break
    return stopped


def _wait_gone(procs: list, timeout: float) -> list:
    """The processes still running after `timeout` s. A zombie counts as gone: our services are children of
    the `tlcm stack up` that exited, and how soon init reaps them is not ours to wait for."""
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    while (procs := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return procs


# ---------------------------------------------------------------------------------------------------- commands


def _start_s3(state: StackState, args, host: str, env: dict, shell_env: dict, services: list[dict]) -> str:
    """A local S3 endpoint (moto's server) with local credentials unless the caller has some; returns its URL."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise StackError("--s3 needs moto's server: pip install 'moto[server]'") from None
    s3_port = args.s3_port or _free_port(host)
    if _port_in_use(host, s3_port):
        raise StackError(f"port {s3_port} on {host} is in use; pass --s3-port (0 picks a free one)")
    endpoint = f"http://{host}:{s3_port}"
    creds = {}
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        # moto accepts any credentials: invent local ones (written to STATE/env, never printed)
        creds = {"AWS_ACCESS_KEY_ID": "tlcm-local", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    s3_env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true", **creds}
    env.update(s3_env)
    shell_env.update(s3_env)
    services.append(_start(state, "s3", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(s3_port)], env,
                           url=endpoint))
    return endpoint


def up(args) -> int:
    state = StackState(args.state_dir)
    state.dir.mkdir(parents=True, exist_ok=True)
    prev = state.load()
    if prev and any(_alive(s) for s in prev["services"]):
        raise StackError(f"a stack is already up in {state.dir} (`tlcm stack status`, `tlcm stack down`)")
    host = args.host
    port = args.port or _free_port(host)
    if _port_in_use(host, port):
        raise StackError(f"port {port} on {host} is in use; pass --port (0 picks a free one)")
    api_url = f"http://{host}:{port}/api"
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(state.prefect_home), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if args.no_ui:
        env["PREFECT_SERVER_UI_ENABLED"] = "false"
    # quick pickup for a one-machine try-out (Prefect's defaults poll every 10 s); keep what the caller set
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    shell_env = {"PREFECT_API_URL": api_url}
    services: list[dict] = []
    record = {"state_dir": str(state.dir), "api_url": api_url, "pool": args.pool, "services": services}

    def save() -> None:
        state.save(record)

    try:
        if args.s3:
            endpoint = _start_s3(state, args, host, env, shell_env, services)
            save()
        server = _start(state, "server", [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)],
                        env, url=f"http://{host}:{port}")
        services.append(server)
        save()
        if args.s3:
            _wait_until(lambda: _http_ok(f"{endpoint}/moto-api/"), services[0], "S3 endpoint", args.timeout)
            _make_bucket(args.bucket, env)
            record["bucket"] = f"s3://{args.bucket}"
        _wait_until(lambda: _http_ok(f"{api_url}/health"), server, "Prefect API", args.timeout)
        _ensure_pool(api_url, args.pool)
        names = [f"{args.pool}-worker-{i + 1}" for i in range(args.workers)]
        for n in names:
            cmd = [_bin("prefect"), "worker", "start", "--pool", args.pool, "--name", n]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            services.append(_start(state, n, cmd, env))
            save()
        for svc in services[-len(names):] if names else []:
            _wait_until(lambda n=svc["name"]: n in _worker_names(api_url, args.pool), svc, "worker registration",
                        args.timeout)
    except BaseException:
        _stop(list(reversed(services)))
        state.file.unlink(missing_ok=True)
        raise
    state.write_env(shell_env)
    print(f"tlcm stack up in {state.dir}")
    for svc in services:
        print(f"  {svc['name']:<22} pid {svc['pid']:<8} {svc.get('url') or ''}")
    if record.get("bucket"):
        print(f"  bucket {record['bucket']} (credentials for it in {state.env_file})")
    print(f"\nUse it from a shell:  source {state.env_file}\n"
          f"Then:  prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml\n"
          f"Logs:  {state.logs}/    Stop:  tlcm stack down" + (f" --state-dir {state.dir}" if args.state_dir_given else ""))
    return 0


def _make_bucket(bucket: str, env: dict[str, str]) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=env["AWS_ENDPOINT_URL_S3"])
    if not fs.exists(bucket):
        fs.mkdir(bucket)


def _client(api_url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url)


def _ensure_pool(api_url: str, pool: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with _client(api_url) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))


def _worker_names(api_url: str, pool: str) -> set[str]:
    try:
        with _client(api_url) as client:
            return {w.name for w in client.read_workers_for_work_pool(pool)}
    except Exception:  # noqa: BLE001 - not ready yet
        return set()


def down(args) -> int:
    state = StackState(args.state_dir)
    record = state.load()
    if not record:
        print(f"no stack in {state.dir}")
        return 0
    services = record["services"]
    workers = [s for s in services if s["name"] not in ("server", "s3")]
    others = [s for s in services if s["name"] in ("server", "s3")]
    stopped = _stop(workers) + _stop(others)  # workers first: they report their runs to the server
    state.file.unlink(missing_ok=True)
    print(f"stopped {', '.join(stopped) if stopped else 'nothing (no service was running)'}; "
          f"logs and the Prefect database stay in {state.dir}")
    return 0


def status(args) -> int:
    state = StackState(args.state_dir)
    record = state.load()
    if not record:
        print(f"no stack in {state.dir}")
        return 1
    rows = []
    for svc in record["services"]:
        alive = _alive(svc)
        health = None
        if alive and svc["name"] == "server":
            health = _http_ok(f"{record['api_url']}/health")
        elif alive and svc["name"] == "s3":
            health = _http_ok(f"{svc['url']}/moto-api/")
        rows.append({"name": svc["name"], "pid": svc["pid"], "running": alive, "healthy": health,
                     "url": svc.get("url"), "log": svc["log"]})
    if args.json:
        print(json.dumps({"state_dir": str(state.dir), "api_url": record["api_url"], "services": rows}, indent=2))
    else:
        print(f"stack in {state.dir}  (API {record['api_url']})")
        for r in rows:
            st = ("up" if r["healthy"] in (None, True) else "up, not answering") if r["running"] else "down"
            print(f"  {r['name']:<22} pid {r['pid']:<8} {st:<18} {r['url'] or ''}")
    return 0 if all(r["running"] and r["healthy"] in (None, True) for r in rows) else 1


def add_parser(sub) -> None:
    """Register `tlcm stack` on the CLI's subparsers."""
    s = sub.add_parser("stack", help="a local Prefect server, work pool, workers and (--s3) S3 endpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--state-dir", default=None, help=f"pids, logs, the Prefect database (default {DEFAULT_STATE_DIR}; "
                   "env TLCM_STACK_DIR)")
    s.add_argument("--host", default="127.0.0.1", help="address the server and S3 endpoint listen on")
    s.add_argument("--port", type=int, default=4200, help="Prefect server port (0: a free one)")
    s.add_argument("--pool", default="tlcm-gpu", help="process work pool to create and serve")
    s.add_argument("--workers", type=int, default=1, help="number of workers")
    s.add_argument("--limit", type=int, default=None, help="concurrent flow runs per worker (default: no limit)")
    s.add_argument("--s3", action="store_true", help="also start a local S3 endpoint (moto) with a bucket")
    s.add_argument("--s3-port", type=int, default=0, help="S3 endpoint port (default: a free one)")
    s.add_argument("--bucket", default="tlcm", help="bucket to create on the local S3 endpoint")
    s.add_argument("--no-ui", action="store_true", help="serve the API only (no web UI)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service")
    s.add_argument("--json", action="store_true", help="status as JSON")
    s.set_defaults(func=main)


def main(args) -> int:
    args.state_dir_given = args.state_dir is not None
    args.state_dir = args.state_dir or DEFAULT_STATE_DIR
    if args.workers < 0:
        raise SystemExit("error: --workers must be >= 0")
    try:
        return {"up": up, "down": down, "status": status}[args.action](args)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
