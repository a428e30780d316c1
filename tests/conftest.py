"""Shared fixtures: one embedded local Ray runtime per test session, data paths, small inputs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


# Dummy credentials of the loopback S3 endpoint; tests assert the secret never shows up in
# any output, manifest, report, log or error message.
S3_KEY_ID = "vecgraph-test-key-id"
S3_SECRET = "vecgraph-test-secret-9f3c1d7e5b"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
          "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
          "VECGRAPH_S3_ENDPOINT", "NO_PROXY", "no_proxy")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on loopback: moto in server mode on 127.0.0.1, a free port.

    Sets dummy AWS credentials, the region and AWS_ENDPOINT_URL in os.environ (and points the
    AWS config files at nothing, so a developer's ~/.aws is never read) before any Ray runtime
    starts, so Ray workers inherit them. Yields the endpoint URL, or None when moto or s3fs is
    not installed (tests that need S3 then skip). Stopped, and the environment restored, at the
    end of the session."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # no per-request lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    nothing = str(tmp_path_factory.mktemp("aws") / "absent")
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "VECGRAPH_S3_ENDPOINT"):
        os.environ.pop(k, None)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ.update({"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_CONFIG_FILE": nothing, "AWS_SHARED_CREDENTIALS_FILE": nothing,
                       "NO_PROXY": no_proxy, "no_proxy": no_proxy})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One embedded Ray runtime (address="local", 2 CPUs) shared by every test that needs it;
    started after `s3_server`, so its workers see the loopback S3 endpoint and credentials."""
    import ray

    from vecgraph.jobs import runtime
    from vecgraph.jobs.config import RayConfig

    os.environ.pop("RAY_ADDRESS", None)
    runtime.init(RayConfig(num_cpus=2, object_store_mb=512))
    yield ray
    ray.shutdown()


def shared_data(name: str) -> Path:
    """A dataset folder of ../shared/data, or skip when this checkout has none beside it."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (a fresh clone has no ../shared/data); these tests need "
                    f"the shared real datasets beside the project")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def nasty_vectors(rng: np.random.Generator, n: int = 300, d: int = 16) -> np.ndarray:
    """Clustered float32 data with exact duplicate rows and a constant block (as faiss's tests)."""
    centers = rng.normal(size=(6, d)) * 4
    x = (centers[rng.integers(0, 6, n)] + rng.normal(size=(n, d))).astype(np.float32)
    x[10:25] = x[3]          # a block of exact duplicates
    x[100] = x[200]          # a duplicate pair across parts
    return x


def write_fvecs(path: Path, x: np.ndarray) -> None:
    n, d = x.shape
    rec = np.empty((n, d + 1), dtype="<f4")
    rec[:, 0] = np.array([d], dtype="<i4").view("<f4")[0]
    rec[:, 1:] = x
    rec.tofile(path)
