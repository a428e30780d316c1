"""A driver SIGKILLed half-way through the shard stage; the re-run finishes the rest only."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import write_fvecs

VECGRAPH = [sys.executable, "-m", "vecgraph.jobs.cli"]


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(VECGRAPH + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:  # the killed driver's embedded Ray must not linger
        for p in psutil.Process().children(recursive=True):
            try:
                if os.getpgid(p.pid) == proc.pid:
                    p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _parts(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


@pytest.mark.timeout(600)
def test_killed_shard_resumes_to_identical_parts(tmp_path):
    x = np.random.default_rng(7).normal(size=(6000, 24)).astype(np.float32)
    write_fvecs(tmp_path / "x.fvecs", x)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VECGRAPH_CRASH_AT")}
    args = [str(tmp_path / "x.fvecs"), None, "--parts", "8", "shard.chunk_rows=200", "ray.num_cpus=1"]

    whole = _run(["shard", args[0], str(tmp_path / "whole"), *args[2:]], env)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "resumed"
    killed = _run(["shard", args[0], str(out), *args[2:]], {**env, "VECGRAPH_CRASH_AT": "shard:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    vectors = out / "vectors"
    assert not (vectors / "_manifest.json").exists()
    written = _parts(vectors)
    assert 3 <= len(written) < 8
    (vectors / "part-00007.parquet.dead0001.tmp").write_bytes(b"half a part")  # a leftover

    status = subprocess.run(VECGRAPH + ["status", str(out)], env=env, capture_output=True, text=True)
    assert "partial" in status.stdout and "missing" in status.stdout

    resumed = _run(["shard", args[0], str(out), *args[2:]], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _parts(vectors) == _parts(tmp_path / "whole" / "vectors")
    for name, data in written.items():  # committed parts were kept, not rewritten
        assert _parts(vectors)[name] == data
    assert not list(vectors.glob("*.tmp"))
    assert (vectors / "_manifest.json").exists()
