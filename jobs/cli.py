"""The `vecgraph` command: run, shard, status, report. Exit codes: 0 done, 2 bad input/config, 1 failure."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from vecgraph.jobs import config as config_mod
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError


def _run(args: argparse.Namespace) -> int:
    from vecgraph.jobs import pipeline
    cfg = config_mod.load(args.config, args.overrides)
    done = pipeline.run(cfg)
    print(pipeline.summary(cfg, done))
    return 0


def _shard(args: argparse.Namespace) -> int:
    overrides = [f"input={args.input}", f"out={args.out}", "stages=[shard]",
                 f"shard.format={args.format}", f"on_invalid={args.on_invalid}"]
    if args.parts:
        overrides.append(f"shard.parts={args.parts}")
    if args.engine:
        overrides.append(f"shard.engine={args.engine}")
    args.config, args.overrides = None, overrides + args.overrides
    return _run(args)


def _status(args: argparse.Namespace) -> int:
    """Which stages and parts under OUT are committed, planned but missing, or absent."""
    _require_folder(args.out)
    for stage, folder in schema.STAGE_DIRS.items():
        uri = storage.join(args.out, folder)
        m = storage.read_manifest(uri)
        if m is not None:
            print(f"{stage:<10} committed  {len(m.parts):>4} parts {m.n_rows:>12} rows  "
                  f"{m.stats.get('seconds', 0):.1f} s  {uri}")
            continue
        plan_uri = storage.join(uri, schema.PLAN)
        if storage.exists(plan_uri):
            planned = [p["path"] for p in json.loads(storage.read_bytes(plan_uri))["parts"]]
            have = [p for p in planned if storage.exists(storage.join(uri, p))]
            missing = [p for p in planned if p not in have]
            print(f"{stage:<10} partial    {len(have)}/{len(planned)} parts written; missing: "
                  f"{', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        else:
            print(f"{stage:<10} absent")
    rep = storage.join(args.out, "report.json")
    print(f"{'report':<10} {'written' if storage.exists(rep) else 'absent'}")
    return 0


def _require_folder(out: str) -> None:
    if not storage.exists(out):
        raise InputError(f"{out}: no such output folder; give the `out` of a vecgraph run")


def _report(args: argparse.Namespace) -> int:
    from vecgraph.jobs import report, runtime
    _require_folder(args.out)
    runtime.init(config_mod.RayConfig())
    print(json.dumps(report.run(args.out), indent=2, default=float))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vecgraph", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the stages a config lists")
    r.add_argument("config", help="YAML config, e.g. conf/demo.yaml")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. knn.k=20 out=runs/x")
    r.set_defaults(fn=_run)
    s = sub.add_parser("shard", help="shard an input into OUT/vectors (the shard stage alone)")
    s.add_argument("input")
    s.add_argument("out")
    s.add_argument("--parts", type=int)
    s.add_argument("--format", default="auto")
    s.add_argument("--engine", choices=["ray", "spark"], help="ingest engine (default: ray)")
    s.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    s.add_argument("overrides", nargs="*", help="more key=value overrides")
    s.set_defaults(fn=_shard)
    st = sub.add_parser("status", help="show which stages and parts under OUT are committed")
    st.add_argument("out")
    st.set_defaults(fn=_status)
    rp = sub.add_parser("report", help="(re)compute OUT/report.json and .html from the committed stages")
    rp.add_argument("out")
    rp.set_defaults(fn=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("ray", "filelock", "botocore", "s3fs", "fsspec", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    p = parser()
    args, extra = p.parse_known_args(argv)
    # key=value overrides may also follow options (vecgraph shard IN OUT --parts 8 k=v)
    if extra:
        if [e for e in extra if e.startswith("-") or "=" not in e] or not hasattr(args, "overrides"):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except InputError as e:
        print(f"vecgraph: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any other failure is retryable (exit 1)
        logging.getLogger("vecgraph").exception("failed")
        print(f"vecgraph: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
