"""Shard-stage benchmark: vecgraph (Ray) vs a plain single-process pyarrow conversion.

Generates an N x D float32 .fvecs (default 10M x 96, 3.8 GB), shards it with `vecgraph shard`
and converts it with plain pyarrow in one process, in the same run, and prints a table:
wall time, throughput (input MB/s) and the peak private memory of the largest process
(private pages, without memory-mapped input pages and Ray's shared-memory object store).
Deletes everything it wrote at the end.

    python bench/shard.py                      # the full 10M x 96 run (about 12 GB of disk)
    python bench/shard.py --rows 1000000       # a quicker one
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import timed_tree

PLAIN = r'''
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
src, dst, d, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rec = np.memmap(src, dtype="<f4", mode="r").reshape(-1, d + 1)
schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), d))])
with pq.ParquetWriter(dst, schema, compression="zstd") as w:
    for a in range(0, len(rec), chunk):
        x = np.ascontiguousarray(rec[a:a + chunk, 1:])
        assert np.isfinite(x).all()
        w.write_table(pa.table([pa.array(np.arange(a, a + len(x))),
                                pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)],
                               schema=schema))
'''


def write_fvecs(path: Path, n: int, d: int, seed: int = 0, block: int = 1_000_000) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for a in range(0, n, block):
            m = min(block, n - a)
            rec = np.empty((m, d + 1), dtype="<f4")
            rec[:, 0] = np.array([d], "<i4").view("<f4")[0]
            rec[:, 1:] = rng.standard_normal((m, d), dtype=np.float32)
            rec.tofile(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--parts", type=int, default=40)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="vecgraph-bench-shard-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "input.fvecs"
    bindir = Path(sys.executable).parent
    try:
        t0 = time.perf_counter()
        write_fvecs(src, args.rows, args.dim)
        size_mb = src.stat().st_size / 2**20
        print(f"generated {src} ({size_mb:.0f} MiB) in {time.perf_counter() - t0:.0f} s", flush=True)
        exclude = ("/dev/shm", str(src))
        plain = timed_tree([sys.executable, "-c", PLAIN, str(src), str(work / "plain.parquet"),
                            str(args.dim), str(args.chunk_rows)], exclude)
        env_cmd = [str(bindir / "vecgraph"), "shard", str(src), str(work / "out"), "--parts",
                   str(args.parts), f"shard.chunk_rows={args.chunk_rows}"]
        ours = timed_tree(env_cmd, exclude)
        manifest = json.loads((work / "out" / "vectors" / "_manifest.json").read_text())
        stage_s = manifest["stats"]["seconds"]
        print()
        print(f"shard {args.rows:,} x {args.dim} float32 .fvecs ({size_mb:.0f} MiB), "
              f"{os.cpu_count()} cores, {args.parts} parts, chunks of {args.chunk_rows} rows")
        print(f"{'':<34}{'wall s':>9}{'MB/s':>9}{'peak private MiB':>18}  {'processes':>9}  largest")
        print(f"{'plain pyarrow, 1 process':<34}{plain[0]:>9.1f}{size_mb / plain[0]:>9.0f}"
              f"{plain[1]:>18.0f}  {plain[3]:>9}  {plain[2]}")
        print(f"{'vecgraph shard (Ray), whole cmd':<34}{ours[0]:>9.1f}{size_mb / ours[0]:>9.0f}"
              f"{ours[1]:>18.0f}  {ours[3]:>9}  {ours[2]}")
        print(f"{'vecgraph shard stage alone':<34}{stage_s:>9.1f}{size_mb / stage_s:>9.0f}")
        print(f"throughput ratio vecgraph/plain: whole command {plain[0] / ours[0]:.2f}x, "
              f"stage {plain[0] / stage_s:.2f}x (goal >= 0.8x); largest process "
              f"{ours[1]:.0f} MiB (goal <= 1024 MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
