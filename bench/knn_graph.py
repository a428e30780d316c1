"""k-NN graph benchmark: vecgraph (local Ray, 4 parts) vs Faiss in one process vs pynndescent.

One run, side by side, on the same data and the same index and search parameters:
a synthetic 1M x 64 Gaussian mixture (1,000 clusters, seed 0), and from ../shared/data MNIST
(10k x 784), AG News (7.6k x 384 MiniLM, cosine) and WordNet (118k x 384 MiniLM, cosine).
Each method runs in its own process; the table gives the build+search seconds (vecgraph: its
index and knn stages from their manifests, and the whole command with Ray start-up and
sharding), recall@10 against exact search on 1,000 sampled nodes (ties count as hits), and the
peak private memory of the largest process of each run. Exact mode: a 200k x 64 full graph, and
20k sampled queries against the 1M base, extrapolated to the full graph.

    python bench/knn_graph.py                 # everything (about 45 minutes on 2 cores)
    python bench/knn_graph.py --quick         # smaller synthetic set, no WordNet
    python bench/knn_graph.py --only mnist,agnews
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import timed_tree

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
K = 10


# ---------------------------------------------------------------- data

def synthetic(n: int, d: int = 64, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * 3
    x = centers[rng.integers(0, clusters, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def load(name: str, scratch: Path) -> tuple[np.ndarray, str, str]:
    """(x float32, metric, vecgraph input path) of a dataset."""
    if name.startswith("synth"):
        n = int(float(name[5:].rstrip("k")) * 1000) if name.endswith("k") else 1_000_000
        path = scratch / f"{name}.npy"
        if not path.exists():
            np.save(path, synthetic(n))
        return np.load(path), "l2", str(path)
    if name == "mnist":
        with gzip.open(DATA / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784).astype(np.float32)
        return x, "l2", str(DATA / "mnist")
    if name == "agnews":
        import pyarrow.parquet as pq
        path = DATA / "agnews-minilm" / "agnews_test_minilm.parquet"
        t = pq.read_table(path, columns=["vector"])
        x = t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, 384)
        return np.ascontiguousarray(x, np.float32), "cosine", str(path)
    if name == "wordnet":
        path = DATA / "wordnet-minilm" / "vectors.f16.npy"
        return np.load(path).astype(np.float32), "cosine", str(path)
    raise SystemExit(f"unknown dataset {name}")


def distances(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """float64 exact distances (nq, nb), smaller is closer."""
    q, b = xq.astype(np.float64), xb.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return 1 - q @ b.T
    return (q * q).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * q @ b.T


def exact_sample(x: np.ndarray, metric: str, sample: np.ndarray) -> np.ndarray:
    """Exact k-th neighbour distance of each sampled node (itself excluded) -> (s,)."""
    kth = []
    for a in range(0, len(sample), 250):
        s = sample[a:a + 250]
        D = distances(x[s], x, metric)
        D[np.arange(len(s)), s] = np.inf
        kth.append(np.partition(D, K - 1, axis=1)[:, K - 1])
    return np.concatenate(kth)


def recall(x: np.ndarray, metric: str, sample: np.ndarray, kth: np.ndarray, I: np.ndarray) -> float:
    """recall@K of graph rows I (s, K) of the sampled nodes; a neighbour within the exact k-th
    distance (1e-6 relative) is a hit, so ties do not count against a method."""
    hits = 0
    for r, (s, row) in enumerate(zip(sample, I)):
        row = row[(row >= 0) & (row != s)][:K]
        d = distances(x[s:s + 1], x[row], metric)[0]
        hits += int((d <= kth[r] + abs(kth[r]) * 1e-6 + 1e-9).sum())
    return hits / (K * len(sample))


# ---------------------------------------------------------------- one method per process

def run_method(args: argparse.Namespace) -> None:
    """Child process: build and search with one method, save the sampled rows and timings."""
    scratch = Path(args.scratch)
    x, metric, _ = load(args.data, scratch)
    sample = np.load(scratch / f"{args.data}.sample.npy")
    info: dict = {}
    if args.run == "faiss":
        import faiss
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        xs = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
        index = faiss.index_factory(x.shape[1], args.factory,
                                    faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            index.train(xs[rng.choice(len(xs), min(args.train_size, len(xs)), replace=False)])
        index.add(xs)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = args.nprobe
        _, I = index.search(xs, K + 1)
        info["seconds"] = time.perf_counter() - t0
        rows = I[sample]
    elif args.run == "pynndescent":
        from pynndescent import NNDescent
        t0 = time.perf_counter()
        warm = NNDescent(x[:2000], metric="euclidean" if metric == "l2" else "cosine",
                         n_neighbors=K + 1, random_state=0)
        _ = warm.neighbor_graph  # JIT compilation, timed apart
        info["jit_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        nnd = NNDescent(x, metric="euclidean" if metric == "l2" else "cosine", n_neighbors=K + 1,
                        random_state=0, n_jobs=args.threads)
        I, _ = nnd.neighbor_graph
        info["seconds"] = time.perf_counter() - t0
        rows = I[sample]
    elif args.run == "exact-queries":
        # vecgraph's exact kernel vs Faiss Flat on nq sampled queries against the whole base.
        import faiss
        from threadpoolctl import threadpool_limits

        from vecgraph.graph import knn
        q = x[sample]
        with threadpool_limits(args.threads):
            t0 = time.perf_counter()
            knn.search_exact(q, x, np.arange(len(x)), K + 1, metric)
            info["vecgraph_seconds"] = time.perf_counter() - t0
        faiss.omp_set_num_threads(args.threads)
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        t0 = time.perf_counter()
        index.search(q, K + 1)
        info["faiss_seconds"] = time.perf_counter() - t0
        rows = np.zeros((len(sample), K), np.int64)
    np.save(scratch / f"rows-{args.tag}.npy", rows)
    (scratch / f"info-{args.tag}.json").write_text(json.dumps(info))


def child(method: str, data: str, scratch: Path, tag: str, **kw) -> tuple[dict, float, np.ndarray]:
    cmd = [sys.executable, __file__, "--run", method, "--data", data, "--scratch", str(scratch),
           "--tag", tag] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    wall, mb, _, _ = timed_tree(cmd, ("/dev/shm",))
    info = json.loads((scratch / f"info-{tag}.json").read_text())
    return info, mb, np.load(scratch / f"rows-{tag}.npy")


def vecgraph(data: str, scratch: Path, tag: str, factory: str, nprobe: int,
             train_size: int) -> tuple[dict, float, np.ndarray]:
    _, metric, path = load(data, scratch)
    out = scratch / f"vg-{tag}"
    cmd = [str(Path(sys.executable).parent / "vecgraph"), "run", str(ROOT / "conf" / "demo.yaml"),
           f"input={path}", f"out={out}", "stages=[shard,index,knn]", "shard.parts=4",
           f"index.factory={factory}", f"index.train_size={train_size}", f"knn.k={K}",
           f"knn.metric={metric}", f"knn.nprobe={nprobe}", "knn.recall_sample=0"]
    wall, mb, _, _ = timed_tree(cmd, ("/dev/shm",))
    import pyarrow.dataset as ds
    seconds = sum(json.loads((out / s / "_manifest.json").read_text())["stats"]["seconds"]
                  for s in ("index", "graph"))
    g = ds.dataset(str(out / "graph"), format="parquet").to_table().sort_by("id")
    sample = np.load(scratch / f"{data}.sample.npy")
    I = np.stack(g.column("neighbors").to_numpy(zero_copy_only=False))[sample]
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "command_seconds": wall}, mb, I


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="synth,mnist,agnews,wordnet,exact")
    ap.add_argument("--quick", action="store_true", help="200k synthetic, no WordNet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-pynndescent", action="store_true")
    # child mode
    ap.add_argument("--run")
    ap.add_argument("--data")
    ap.add_argument("--scratch")
    ap.add_argument("--tag")
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--train-size", type=int, default=65536)
    args = ap.parse_args()
    if args.run:
        return run_method(args)
    only = args.only.split(",")
    big = "synth200k" if args.quick else "synth"
    plans = []  # (dataset, label, factory, nprobe, train_size)
    if "synth" in only:
        plans += [(big, "IVF1024,Flat np16", "IVF1024,Flat", 16, 65536)]
    if "mnist" in only:
        plans += [("mnist", "Flat (exact)", "Flat", 1, 1),
                  ("mnist", "IVF100,Flat np10", "IVF100,Flat", 10, 10000)]
    if "agnews" in only:
        plans += [("agnews", "Flat (exact)", "Flat", 1, 1)]
    if "wordnet" in only and not args.quick:
        plans += [("wordnet", "Flat (exact)", "Flat", 1, 1),
                  ("wordnet", "IVF1024,Flat np16", "IVF1024,Flat", 16, 65536)]
    if "exact" in only:
        plans += [("synth200k", "Flat (exact)", "Flat", 1, 1)]
    scratch = Path(tempfile.mkdtemp(prefix="vecgraph-bench-knn-"))
    rows_out = []
    try:
        for data in dict.fromkeys(p[0] for p in plans):
            if data in ("mnist", "agnews", "wordnet") and not DATA.exists():
                print(f"skip {data}: {DATA} is absent")
                continue
            x, metric, _ = load(data, scratch)
            sample = np.sort(np.random.default_rng(1).choice(len(x), min(1000, len(x)), replace=False))
            np.save(scratch / f"{data}.sample.npy", sample)
            kth = exact_sample(x, metric, sample)
            nnd_done = False
            for _, label, factory, nprobe, train in [p for p in plans if p[0] == data]:
                tag = f"{data}-{factory.replace(',', '_')}"
                print(f"[{time.strftime('%H:%M:%S')}] {data} {label} ...", flush=True)
                vg, vg_mb, vg_rows = vecgraph(data, scratch, tag, factory, nprobe, train)
                fa, fa_mb, fa_rows = child("faiss", data, scratch, tag + "-faiss", factory=factory,
                                           nprobe=nprobe, train_size=train, threads=args.threads)
                r_vg, r_fa = recall(x, metric, sample, kth, vg_rows), recall(x, metric, sample, kth, fa_rows)
                rows_out.append((data, f"n={len(x)} d={x.shape[1]} {metric}", label, "vecgraph",
                                 vg["seconds"], r_vg, vg_mb,
                                 f"whole command {vg['command_seconds']:.0f} s; vs Faiss "
                                 f"{vg['seconds'] / fa['seconds']:.2f}x"))
                rows_out.append((data, "", label, "faiss (1 process)", fa["seconds"], r_fa, fa_mb, ""))
                if not nnd_done and not args.no_pynndescent:
                    nd, nd_mb, nd_rows = child("pynndescent", data, scratch, tag + "-nnd",
                                               threads=args.threads)
                    r_nd = recall(x, metric, sample, kth, nd_rows)
                    rows_out.append((data, "", "default params", "pynndescent", nd["seconds"], r_nd,
                                     nd_mb, f"JIT warm-up {nd['jit_seconds']:.0f} s excluded; "
                                     f"vecgraph {label} is {nd['seconds'] / vg['seconds']:.1f}x faster"))
                    nnd_done = True
                _print(rows_out[-3:])
        if "exact" in only and not args.quick:
            x, metric, _ = load("synth", scratch)
            sample = np.sort(np.random.default_rng(2).choice(len(x), 20000, replace=False))
            np.save(scratch / "synth.sample.npy", sample)
            info, mb, _ = child("exact-queries", "synth", scratch, "exactq", threads=args.threads)
            scale = len(x) / len(sample)
            flops = 2 * len(sample) * len(x) * 64
            for method, key in (("vecgraph kernel", "vecgraph_seconds"),
                                ("faiss IndexFlatL2", "faiss_seconds")):
                rows_out.append(("synth", "20k queries x 1M base", "exact, extrapolated to 1M", method,
                                 info[key] * scale, 1.0, mb, f"{flops / info[key] / 1e9:.0f} GFLOP/s-eq"))
        print("\n" + "=" * 100)
        _print(rows_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _print(rows: list[tuple]) -> None:
    print(f"| dataset | shape | index / params | method | seconds | recall@{K} | peak private MiB | notes |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.4f} | {r[6]:.0f} | {r[7]} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
