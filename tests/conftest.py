"""Shared fixtures: one embedded local Ray runtime per test session, data paths, small inputs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray runtime (address="local", 2 CPUs) shared by every test that needs it."""
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
