"""`ray job submit` of a pipeline to a head started with `ray start --head` on its own ports."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop this head only (`ray stop` would also stop the tests' own embedded runtime)."""
    try:
        parent = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_demo_on_a_cluster(tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    gcs, dash, client, nm, om, agent, metrics, wmin = free_ports(8)
    temp = tempfile.mkdtemp(prefix="vgray")  # short: Ray's unix socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray >= 2.5x enables token authentication on a new head; give head and client one token.
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
         f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", f"--min-worker-port={wmin}",
         f"--max-worker-port={wmin + 200}", "--num-cpus=2", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                   env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, f"head never answered: {probe.stderr[-2000:]}"
            time.sleep(3)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--", "vecgraph", "run", "conf/demo.yaml", f"out={out}"],
            env=env, capture_output=True, text=True, timeout=480, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr)
        # The job ran on this head: it is listed there as SUCCEEDED.
        listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                env=env, capture_output=True, text=True)
        assert "SUCCEEDED" in listed.stdout
        report = json.loads((out / "report.json").read_text())
        assert set(report["stages"]) == {"shard", "index", "knn", "kmeans", "mcl", "propagate"}
        assert report["stages"]["knn"]["recall_at_k"] == 1.0
        for folder in ("vectors", "index", "graph", "kmeans", "mcl", "labels"):
            assert (out / folder / "_manifest.json").exists()
    finally:
        kill_tree(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
