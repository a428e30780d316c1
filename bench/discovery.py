"""Discovery benchmark: vecgraph's k-means, MCL and label propagation side by side with
faiss.Kmeans, scikit-learn, van Dongen's `mcl` and a single-process scipy diffusion.

Same inputs for every method: a synthetic mixture (1,000 Gaussian clusters in 64-d, its true
labels), and from ../shared/data MNIST, AG News and WordNet (45 lexicographer labels). The
10-NN graph is computed once by vecgraph (Flat up to 200k nodes, IVF above) and every graph
method reads that same graph. Each run is its own process; the table gives seconds, quality
(NMI against the labels, or accuracy on non-seed nodes) and the peak private memory of the
largest process of the run.

    python bench/discovery.py --only synth100k,mnist,agnews,wordnet
    python bench/discovery.py --only synth1M --skip labelspreading
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
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from common import timed_tree

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VECGRAPH = str(Path(sys.executable).parent / "vecgraph")


def dataset(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(x float32, labels, metric)."""
    if name.startswith("synth"):
        n = {"synth100k": 100_000, "synth1M": 1_000_000}[name]
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((1000, 64), dtype=np.float32) * 3
        y = rng.integers(0, 1000, n)
        return centers[y] + rng.standard_normal((n, 64), dtype=np.float32), y, "l2"
    if name == "mnist":
        with gzip.open(DATA / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784).astype(np.float32)
        with gzip.open(DATA / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        return x, y, "l2"
    if name == "agnews":
        t = pq.read_table(DATA / "agnews-minilm" / "agnews_test_minilm.parquet")
        x = t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, 384)
        return np.ascontiguousarray(x, np.float32), t.column("label").to_numpy().astype(np.int64), "cosine"
    if name == "wordnet":
        x = np.load(DATA / "wordnet-minilm" / "vectors.f16.npy").astype(np.float32)
        y = pq.read_table(DATA / "wordnet-minilm" / "meta.parquet").column("lexname_id").to_numpy()
        return x, y.astype(np.int64), "cosine"
    raise SystemExit(f"unknown dataset {name}")


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import normalized_mutual_info_score
    return float(normalized_mutual_info_score(a, b))


# ---------------------------------------------------------------- reference methods (children)

def child_main(args: argparse.Namespace) -> None:
    scratch = Path(args.scratch)
    x, y, metric = dataset(args.data)
    res: dict = {}
    if args.run == "faiss-kmeans":
        import faiss
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        km = faiss.Kmeans(x.shape[1], args.k, niter=args.niter, seed=1)
        km.train(x)
        _, c = km.index.search(x, 1)
        res = {"seconds": time.perf_counter() - t0, "nmi": nmi(y, c[:, 0])}
    elif args.run == "minibatch-kmeans":
        from sklearn.cluster import MiniBatchKMeans
        t0 = time.perf_counter()
        c = MiniBatchKMeans(args.k, random_state=0, n_init=1, batch_size=4096).fit_predict(x)
        res = {"seconds": time.perf_counter() - t0, "nmi": nmi(y, c)}
    elif args.run in ("scipy-diffusion", "labelspreading"):
        seeds = pq.read_table(scratch / "vg" / "labels" / "_seeds.parquet").to_pandas()
        sid, slab = seeds["id"].to_numpy(), seeds["label"].to_numpy()
        non_seed = np.ones(len(x), bool)
        non_seed[sid] = False
        t0 = time.perf_counter()
        if args.run == "labelspreading":
            from sklearn.semi_supervised import LabelSpreading
            yy = np.full(len(x), -1)
            yy[sid] = slab
            pred = LabelSpreading(kernel="knn", n_neighbors=10).fit(x, yy).transduction_
        else:
            pred = scipy_diffusion(scratch / "vg" / "graph", metric, len(x), sid, slab, args.niter)
        res = {"seconds": time.perf_counter() - t0, "accuracy": float((pred[non_seed] == y[non_seed]).mean())}
    (scratch / f"res-{args.run}.json").write_text(json.dumps(res))


def scipy_diffusion(graph_dir: Path, metric: str, n: int, sid: np.ndarray, slab: np.ndarray,
                    niter: int) -> np.ndarray:
    """Dense-label diffusion F <- D^-1 W F with seeds clamped, on the same weighted graph."""
    import scipy.sparse as sp
    g = ds.dataset(str(graph_dir), format="parquet").to_table()
    ids = g.column("id").to_numpy()
    I = g.column("neighbors").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    D = g.column("distances").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    d = np.sqrt(np.maximum(D, 0)) if metric == "l2" else np.maximum(D, 0)
    ok = I >= 0
    W = sp.csr_matrix((np.exp(-d[ok] / d[ok].mean()), (np.repeat(ids, I.shape[1])[ok.ravel()], I[ok])),
                      shape=(n, n))
    W = W.maximum(W.T).tocsr()
    P = sp.diags(1 / np.maximum(np.asarray(W.sum(1)).ravel(), 1e-30)) @ W
    classes = np.unique(slab)
    Y = np.zeros((n, len(classes)), np.float32)
    Y[sid, np.searchsorted(classes, slab)] = 1
    F = Y.copy()
    for _ in range(niter):
        F = P @ F
        F[sid] = Y[sid]
    return np.where(F.max(1) > 0, classes[F.argmax(1)], -1)


def child(run: str, data: str, scratch: Path, **kw) -> tuple[dict, float]:
    cmd = [sys.executable, __file__, "--run", run, "--data", data, "--scratch", str(scratch)] + \
          [f"--{k}={v}" for k, v in kw.items()]
    _, mb, _, _ = timed_tree(cmd, ("/dev/shm",))
    return json.loads((scratch / f"res-{run}.json").read_text()), mb


# ---------------------------------------------------------------- vecgraph and mcl

def vecgraph(scratch: Path, *overrides: str) -> tuple[float, dict]:
    cmd = [VECGRAPH, "run", str(ROOT / "conf" / "demo.yaml"), f"input={scratch / 'input.parquet'}",
           f"out={scratch / 'vg'}", "shard.parts=4", *overrides]
    _, mb, _, _ = timed_tree(cmd, ("/dev/shm",))
    return mb, json.loads((scratch / "vg" / "report.json").read_text())["stages"]


def mcl_binary(scratch: Path, metric: str, n: int) -> tuple[float, np.ndarray, float]:
    """van Dongen's mcl -I 2.0 -te 2 on the same max-symmetrised weighted graph."""
    import scipy.sparse as sp
    g = ds.dataset(str(scratch / "vg" / "graph"), format="parquet").to_table()
    ids = g.column("id").to_numpy()
    I = g.column("neighbors").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    D = g.column("distances").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    d = np.sqrt(np.maximum(D, 0)) if metric == "l2" else np.maximum(D, 0)
    ok = I >= 0
    W = sp.coo_matrix((np.exp(-d[ok] / d[ok].mean()), (np.repeat(ids, I.shape[1])[ok.ravel()], I[ok])),
                      shape=(n, n)).tocsr()
    W = sp.triu(W.maximum(W.T), 1).tocoo()
    with open(scratch / "g.abc", "w") as f:
        np.savetxt(f, np.column_stack([W.row, W.col, W.data]), fmt=["%d", "%d", "%.6g"], delimiter="\t")
    cmd = ["mcl", str(scratch / "g.abc"), "--abc", "-I", "2.0", "-te", "2", "-o", str(scratch / "mcl.out")]
    t0 = time.perf_counter()
    _, mb, _, _ = timed_tree(cmd, ("/dev/shm",))
    seconds = time.perf_counter() - t0
    lab = np.arange(n) + n  # nodes mcl never saw are singletons
    for c, line in enumerate(open(scratch / "mcl.out")):
        lab[np.array(line.split(), dtype=np.int64)] = c
    return seconds, lab, mb


def bench(data: str, args: argparse.Namespace, table: list) -> None:
    x, y, metric = dataset(data)
    n, k_true = len(x), len(np.unique(y))
    scratch = Path(tempfile.mkdtemp(prefix=f"vecgraph-bench-disc-{data}-"))
    try:
        pq.write_table(pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
                                 "label": pa.array(y)}), scratch / "input.parquet", row_group_size=65536)
        factory = "Flat" if n <= 200_000 else "IVF1024,Flat"
        print(f"[{time.strftime('%H:%M:%S')}] {data}: {n} x {x.shape[1]}, graph ({factory}) ...", flush=True)
        vecgraph(scratch, "stages=[shard,index,knn,report]", f"index.factory={factory}", "knn.nprobe=16",
                 f"knn.metric={metric}", "knn.k=10", "index.train_size=65536")
        shape = f"n={n} d={x.shape[1]} {metric}"
        if "kmeans" not in args.skip:
            kk = 1000 if data.startswith("synth") else k_true
            print(f"[{time.strftime('%H:%M:%S')}] {data}: k-means k={kk}", flush=True)
            mb, rep = vecgraph(scratch, "stages=[shard,kmeans,report]", f"kmeans.k={kk}",
                               f"kmeans.niter={args.niter}", "kmeans.n_init=1", "kmeans.init=random")
            fa, fmb = child("faiss-kmeans", data, scratch, k=kk, niter=args.niter, threads=args.threads)
            mk, mmb = child("minibatch-kmeans", data, scratch, k=kk)
            vs = rep["kmeans"]["seconds"]
            table += [(data, shape, f"k-means k={kk}, {args.niter} it", "vecgraph", vs,
                       f"NMI {rep['kmeans']['nmi']:.4f}", mb, f"{vs / fa['seconds']:.2f}x Faiss's time"),
                      (data, "", "", "faiss.Kmeans", fa["seconds"], f"NMI {fa['nmi']:.4f}", fmb, ""),
                      (data, "", "", "sklearn MiniBatchKMeans", mk["seconds"], f"NMI {mk['nmi']:.4f}", mmb, "")]
        if "mcl" not in args.skip:
            print(f"[{time.strftime('%H:%M:%S')}] {data}: MCL", flush=True)
            mb, rep = vecgraph(scratch, "stages=[mcl,report]", "mcl.inflation=2.0")
            vm = ds.dataset(str(scratch / "vg" / "mcl"), format="parquet").to_table().sort_by("id")
            ours = vm.column("cluster").to_numpy()
            secs, theirs, bmb = mcl_binary(scratch, metric, n)
            table += [(data, shape, "MCL I=2.0", "vecgraph", rep["mcl"]["seconds"],
                       f"NMI {rep['mcl']['nmi']:.4f}, {rep['mcl']['n_clusters']} clusters", mb,
                       f"NMI vs mcl {nmi(theirs, ours):.4f}; mcl/vecgraph time "
                       f"{secs / rep['mcl']['seconds']:.2f}x"),
                      (data, "", "", "mcl -I 2.0 -te 2", secs,
                       f"NMI {nmi(y, theirs):.4f}, {len(np.unique(theirs))} clusters", bmb, "")]
        if "propagate" not in args.skip:
            print(f"[{time.strftime('%H:%M:%S')}] {data}: label propagation, 1% seeds", flush=True)
            mb, rep = vecgraph(scratch, "stages=[propagate,report]", "propagate.seed_fraction=0.01")
            sd, smb = child("scipy-diffusion", data, scratch, niter=rep["propagate"]["iterations"])
            vs = rep["propagate"]["seconds"]
            table += [(data, shape, "propagation, 1% seeds", "vecgraph", vs,
                       f"acc {rep['propagate']['accuracy']:.4f}", mb,
                       f"{rep['propagate']['iterations']} iterations; {vs / sd['seconds']:.2f}x scipy's time"),
                      (data, "", "", "scipy diffusion (1 process)", sd["seconds"], f"acc {sd['accuracy']:.4f}",
                       smb, "same graph, seeds and iterations")]
            if "labelspreading" not in args.skip and n <= 120_000:
                ls, lmb = child("labelspreading", data, scratch)
                table += [(data, "", "", "sklearn LabelSpreading(knn)", ls["seconds"],
                           f"acc {ls['accuracy']:.4f}", lmb, f"vecgraph {ls['seconds'] / vs:.1f}x faster")]
        _print(table)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _print(rows: list[tuple]) -> None:
    print("| dataset | shape | task | method | seconds | quality | peak private MiB | notes |")
    print("|---|---|---|---|---:|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]} | {r[6]:.0f} | {r[7]} |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="synth100k,mnist,agnews,wordnet")
    ap.add_argument("--skip", default="", help="comma list of kmeans,mcl,propagate,labelspreading")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run")
    ap.add_argument("--data")
    ap.add_argument("--scratch")
    ap.add_argument("--k", type=int)
    args = ap.parse_args()
    if args.run:
        return child_main(args)
    if not shutil.which("mcl"):
        print("note: `mcl` is not installed (apt-get install mcl); MCL rows need it")
    table: list = []
    for data in args.only.split(","):
        if data in ("mnist", "agnews", "wordnet") and not DATA.exists():
            print(f"skip {data}: {DATA} is absent")
            continue
        bench(data, args, table)
    print("\n" + "=" * 100)
    _print(table)


if __name__ == "__main__":
    main()
