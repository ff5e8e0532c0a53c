"""A local S3 endpoint (moto server) for the benchmarks, with dummy credentials."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


@contextmanager
def moto_s3(bucket: str = "bench"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_ENDPOINT_URL_S3": url}
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem(key="bench", secret="bench-secret", endpoint_url=url).mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
