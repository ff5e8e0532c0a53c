"""Store throughput: zarr write/read MB/s on a local folder and on a local S3 endpoint (moto), vs a raw copy of
the same bytes (one file, fsspec put/get), side by side.

    python bench/bench_store.py [--mb 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from _s3 import moto_s3
from common import report
from tlcm_core.store import ArtifactStore


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    args = ap.parse_args()
    rows_per_chunk, row = 256, (4, 16, 16)
    n = args.mb * 2**20 // (4 * int(np.prod(row)))
    data = np.random.default_rng(0).standard_normal((n, *row), dtype=np.float32)
    mb = data.nbytes / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as bucket:
        raw = os.path.join(tmp, "raw.bin")
        data.tofile(raw)
        for name, url in (("local folder", os.path.join(tmp, "store")), ("S3 endpoint (moto)", f"{bucket}/s")):
            store = ArtifactStore(url)
            art = store.artifact("bench", "0" * 16)
            t0 = time.perf_counter()
            arr = art.create_array("x", shape=data.shape, chunks=(rows_per_chunk, *row), dtype="float32")
            for i in range(0, n, rows_per_chunk):
                arr[i:i + rows_per_chunk] = data[i:i + rows_per_chunk]
            w = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = art.open_array("x")[...]
            r = time.perf_counter() - t0
            assert np.array_equal(back, data)
            fs = store.fs
            t0 = time.perf_counter()
            fs.put(raw, art.path("raw.bin"))
            cw = time.perf_counter() - t0
            t0 = time.perf_counter()
            fs.get(art.path("raw.bin"), os.path.join(tmp, "back.bin"))
            cr = time.perf_counter() - t0
            rows.append({"store": name, "zarr write MB/s": mb / w, "zarr read MB/s": mb / r,
                         "raw put MB/s": mb / cw, "raw get MB/s": mb / cr,
                         "zarr/raw write": (mb / w) / (mb / cw), "zarr/raw read": (mb / r) / (mb / cr)})
    report("Store throughput: zarr arrays vs a raw copy of the same bytes", rows,
           notes=f"{mb:.0f} MB of float32 latents (4x16x16 rows), chunks of {rows_per_chunk} rows, no compression.")


if __name__ == "__main__":
    main()
