"""Input readers: .npy, .fvecs/.ivecs/.bvecs, MNIST-style IDX (.gz too), Parquet, built-ins.

`open_source` looks only at headers and metadata (never the data) and returns a `Source`:
the input files in sorted order with their row counts. `read_rows(source, start, stop)` reads
one global row range, touching nothing outside it (memory-mapped where the format allows).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - `pa.compute` below; `import pyarrow` alone lacks it
import pyarrow.parquet as pq

from vecgraph.sharding import storage
from vecgraph.sharding.errors import InputError

VEC_FORMATS = {"fvecs": (np.dtype("<f4"), 4), "ivecs": (np.dtype("<i4"), 4), "bvecs": (np.dtype("u1"), 1)}
FORMATS = ("auto", "npy", "fvecs", "ivecs", "bvecs", "idx", "parquet")
BUILTINS = ("sklearn:digits",)


@dataclasses.dataclass(frozen=True)
class NpyLayout:
    """Where the values of an (n, d) .npy file lie: `offset` header bytes, then n*d values of
    `dtype` in C (row-major) or Fortran (column-major) order."""
    n: int
    d: int
    dtype: str                # numpy dtype string, byte order included ('<f4', '>f8', ...)
    fortran: bool
    offset: int


@dataclasses.dataclass
class SourceFile:
    path: str
    fmt: str
    n_rows: int
    offset: int               # global row position of its first row
    labels_path: str | None = None   # IDX labels file paired with an images file
    npy: NpyLayout | None = None     # .npy header, parsed once when planning


@dataclasses.dataclass
class Source:
    """What the shard stage reads: files in sorted order, their row counts, the vector dim."""
    uri: str
    files: list[SourceFile]
    dim: int
    has_labels: bool
    vector_column: str = "vector"
    label_column: str | None = None
    id_column: str | None = None
    label_type: pa.DataType | None = None      # every part's label column has this type
    source_id_type: pa.DataType | None = None  # int64 or string

    @property
    def n_rows(self) -> int:
        return sum(f.n_rows for f in self.files)


@dataclasses.dataclass
class Rows:
    """One row range of the input. x: (m, d) float32 with rows that failed validation removed."""
    ids: np.ndarray                         # (m,) int64 global row positions
    x: np.ndarray                           # (m, d) float32
    labels: pa.Array | None
    source_ids: pa.Array | None
    rejects: list[tuple[int, str, int, str]]  # (id, file, record, reason)


# ---------------------------------------------------------------- planning (headers only)

def _expand(uri: str, fmt: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if any(c in uri for c in "*?["):
        found = sorted(fs.glob(path))
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if not os.path.basename(p).startswith(("_", ".")))
    elif fs.exists(path):
        found = [path]
    else:
        raise InputError(f"{uri}: input not found (set `input` to a file, directory, glob, "
                         f"s3:// URI or one of {', '.join(BUILTINS)})")
    proto = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [proto + p if proto and not str(p).startswith(proto) else str(p) for p in found]


def _detect(path: str) -> str:
    name = os.path.basename(path).lower().removesuffix(".gz")
    for ext in ("npy", "fvecs", "ivecs", "bvecs", "parquet"):
        if name.endswith("." + ext):
            return ext
    if "idx3-ubyte" in name or "idx1-ubyte" in name or name.endswith(".idx"):
        return "idx"
    raise InputError(f"{path}: cannot tell the format from the name; set shard.format to one of "
                     f"{', '.join(FORMATS[1:])}")


REMOTE_BLOCK = 4 * 2**20   # read-ahead of a remote stream (gzip, IDX); s3fs's default is 50 MiB


def _open(path: str):
    fs, p = storage.filesystem(path)
    f = fs.open(p, "rb") if storage.is_local(path) else fs.open(p, "rb", block_size=REMOTE_BLOCK)
    return gzip.open(f) if path.endswith(".gz") else f


def _idx_header(path: str) -> tuple[int, tuple[int, ...]]:
    """(header bytes, shape) of an IDX file (big-endian, uint8 payload expected)."""
    with _open(path) as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0:
            raise InputError(f"{path}: not an IDX file (bad magic {head!r})")
        if head[2] != 0x08:
            raise InputError(f"{path}: IDX type 0x{head[2]:02x} not supported, only uint8 (0x08)")
        ndim = head[3]
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
    return 4 + 4 * ndim, shape


def _vecs_header(path: str, fmt: str) -> tuple[int, int]:
    """(dim, n_records) of an .fvecs/.ivecs/.bvecs file, checking size and byte order."""
    dtype, width = VEC_FORMATS[fmt]
    fs, p = storage.filesystem(path)
    size = fs.size(p)
    if size == 0:
        return 0, 0
    with fs.open(p, "rb") as f:
        raw = f.read(4)
    if len(raw) < 4:
        raise InputError(f"{path}: record 0 is truncated ({size} bytes, a header needs 4)")
    d = struct.unpack("<i", raw)[0]
    if d <= 0 or d > 1 << 20:
        d_be = struct.unpack(">i", raw)[0]
        if 0 < d_be <= 1 << 20:
            raise InputError(f"{path}: record 0 header says dim {d} little-endian but {d_be} "
                             f"big-endian: the file is in the wrong byte order; convert it to "
                             f"little-endian (.{fmt} is little-endian by definition)")
        raise InputError(f"{path}: record 0 header has dim {d}; not a valid .{fmt} file")
    rec = 4 + d * width
    if size % rec:
        raise InputError(f"{path}: record {size // rec} is truncated ({size % rec} of {rec} bytes; "
                         f"file size {size} is not a multiple of the record size): re-export the "
                         f"file or cut it to {size // rec * rec} bytes")
    return d, size // rec


NPY_PREFIX = 4096   # one ranged read holds the header of nearly every .npy (numpy writes ~128 bytes)


def _npy_prefix(path: str, nbytes: int) -> bytes:
    """The first `nbytes` bytes of a file (fewer when it is shorter), without reading the rest."""
    if path.endswith(".gz"):
        with _open(path) as f:
            return f.read(nbytes)
    return storage.read_range(path, 0, nbytes)


def _npy_layout(path: str) -> NpyLayout:
    """Shape, dtype, memory order and data offset of a .npy file from its header alone (one
    ranged read), checking that it is (n, d), numeric and not truncated."""
    head = _npy_prefix(path, NPY_PREFIX)
    try:
        version = np.lib.format.read_magic(io.BytesIO(head))
        # header length: uint16 at byte 8 for version 1.0, uint32 for 2.0/3.0
        length = 10 + struct.unpack("<H", head[8:10])[0] if version == (1, 0) \
            else 12 + struct.unpack("<I", head[8:12])[0]
        if length > len(head):
            head = _npy_prefix(path, length)
        fh = io.BytesIO(head)
        np.lib.format.read_magic(fh)
        # Public readers only (numpy 2 hides _read_array_header); the 2.0 reader also parses
        # 3.0 headers (same length field, ASCII in practice).
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
    except (ValueError, struct.error) as e:
        raise InputError(f"{path}: not a readable .npy file ({e}); re-export it with numpy.save "
                         f"or set shard.format") from None
    if len(shape) != 2:
        raise InputError(f"{path}: .npy of shape {shape}, expected (n, d)")
    if dtype.hasobject or dtype.kind not in "biuf":
        raise InputError(f"{path}: .npy of dtype {dtype}, expected numbers (float, int or uint)")
    n, d = (int(v) for v in shape)
    layout = NpyLayout(n, d, dtype.str, bool(fortran), fh.tell())
    if not path.endswith(".gz"):
        need = layout.offset + n * d * dtype.itemsize
        have = storage.size(path)
        if have < need:
            raise InputError(f"{path}: truncated .npy: its header says {n} x {d} {dtype.str} "
                             f"({need} bytes with the header) but the file has {have} bytes; "
                             f"re-export it")
    return layout


def _parquet_vector_dim(path: str, column: str) -> int | None:
    fs, p = storage.filesystem(path)
    pf = pq.ParquetFile(p, filesystem=fs)
    field = pf.schema_arrow.field(column) if column in pf.schema_arrow.names else None
    if field is None:
        raise InputError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names}); "
                         f"set shard.vector_column")
    if pa.types.is_fixed_size_list(field.type):
        return field.type.list_size
    for rg in range(pf.num_row_groups):
        col = pf.read_row_group(rg, columns=[column]).column(0)
        for v in col.to_pylist():
            if v is not None:
                return len(v)
    return None


def open_source(uri: str, fmt: str = "auto", vector_column: str = "vector",
                label_column: str | None = "label", id_column: str | None = None) -> Source:
    """Plan an input: list its files and count rows from headers/metadata only."""
    if uri in BUILTINS:
        from sklearn.datasets import load_digits
        n, d = load_digits().data.shape
        return Source(uri, [SourceFile(uri, "builtin", n, 0)], d, True, label_type=pa.int64())
    if fmt not in FORMATS:
        raise InputError(f"shard.format={fmt!r} is not one of {', '.join(FORMATS)}")
    paths = _expand(uri, fmt)
    if fmt == "auto":
        paths = [p for p in paths if not p.endswith((".md", ".txt", ".csv", ".json", ".py"))]
    fmts = [fmt if fmt != "auto" else _detect(p) for p in paths]
    files: list[SourceFile] = []
    dims: dict[int, str] = {}  # dim -> first file that has it
    layouts: dict[str, NpyLayout] = {}
    has_labels = False
    if fmts and all(f == "idx" for f in fmts):
        images = [p for p in paths if "idx1-ubyte" not in os.path.basename(p)]
        labels = {os.path.basename(p).split("-labels")[0]: p for p in paths if "idx1-ubyte" in p}
        for p in images:
            _, shape = _idx_header(p)
            lp = labels.get(os.path.basename(p).split("-images")[0])
            if lp is not None:
                n_lab = _idx_header(lp)[1][0]
                if n_lab != shape[0]:
                    raise InputError(f"{lp}: {n_lab} labels for {shape[0]} images in {p}")
            if files and (lp is not None) != has_labels:
                raise InputError(f"{p}: some IDX image files of {uri} have a labels file and "
                                 f"some do not; give labels for all of them or none")
            has_labels = lp is not None
            dims.setdefault(int(np.prod(shape[1:])), p)
            files.append(SourceFile(p, "idx", shape[0], 0, lp))
    else:
        for p, f in zip(paths, fmts):
            if f == "idx":
                raise InputError(f"{p}: IDX files cannot be mixed with other formats in one input")
            if f == "npy":
                layouts[p] = _npy_layout(p)
                n, d = layouts[p].n, layouts[p].d
            elif f in VEC_FORMATS:
                d, n = _vecs_header(p, f)
            else:
                fs, pp = storage.filesystem(p)
                try:
                    n = pq.ParquetFile(pp, filesystem=fs).metadata.num_rows
                except Exception as e:  # pyarrow raises several types for corrupt files
                    raise InputError(f"{p}: not a readable Parquet file ({e}); re-export it") from e
                d = _parquet_vector_dim(p, vector_column) if n else None
                if n and d is None:
                    raise InputError(f"{p}: every row of column {vector_column!r} is null; drop the "
                                     f"file or fill the vectors")
                if label_column and label_column in pq.ParquetFile(pp, filesystem=fs).schema_arrow.names:
                    has_labels = True
            if n:
                dims.setdefault(int(d), p)
                files.append(SourceFile(p, f, int(n), 0, npy=layouts.get(p)))
    if len(dims) > 1:
        (d0, p0), (d1, p1) = list(dims.items())[:2]
        raise InputError(f"{p1}: record 0 has dim {d1}, but {p0} has dim {d0} (the files of "
                         f"{uri} have dims {sorted(dims)}); shard them separately")
    if not files:
        raise InputError(f"{uri}: the input holds no rows")
    offset = 0
    for sf in files:
        sf.offset = offset
        offset += sf.n_rows
    src = Source(uri, files, next(iter(dims)), has_labels, vector_column,
                 label_column if has_labels else None, id_column)
    _column_types(src)
    return src


def _column_types(src: Source) -> None:
    """Fix the label and source-id types from the first file, so every part has one schema."""
    first = src.files[0]
    if first.fmt in ("builtin", "idx"):
        src.label_type = pa.int64() if src.has_labels else None
        if src.id_column:
            raise InputError(f"shard.id_column={src.id_column!r}: {first.fmt} inputs carry no ids; "
                             f"unset it")
        return
    if first.fmt != "parquet":
        if src.id_column:
            raise InputError(f"shard.id_column={src.id_column!r}: .{first.fmt} inputs carry no ids; "
                             f"unset it")
        return
    fs, p = storage.filesystem(first.path)
    names = pq.ParquetFile(p, filesystem=fs).schema_arrow
    if src.label_column:
        src.label_type = names.field(src.label_column).type
    if src.id_column:
        if src.id_column not in names.names:
            raise InputError(f"{first.path}: no id column {src.id_column!r} (columns: {names.names}); "
                             f"set shard.id_column")
        t = names.field(src.id_column).type
        if pa.types.is_integer(t):
            src.source_id_type = pa.int64()
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            src.source_id_type = pa.string()
        else:
            raise InputError(f"{first.path}: id column {src.id_column!r} has type {t}; ids must be "
                             f"integers or strings")


# ---------------------------------------------------------------- reading one range

def _read_ranges(path: str, starts: list[int], ends: list[int]) -> list[bytes]:
    """Byte ranges (ascending) of a file: ranged reads of exactly those bytes, or for .gz a
    forward seek through the decompressed stream (bounded memory)."""
    if not path.endswith(".gz"):
        return storage.read_ranges(path, starts, ends)
    with _open(path) as f:
        out = []
        for s, e in zip(starts, ends):
            f.seek(s)
            out.append(f.read(e - s))
        return out


def _read_npy(sf: SourceFile, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of an (n, d) .npy file: memory-mapped when local; elsewhere ranged reads of
    those rows only (C order: one range; Fortran order: one range per column)."""
    if storage.is_local(sf.path) and not sf.path.endswith(".gz"):
        return np.asarray(np.load(storage.filesystem(sf.path)[1], mmap_mode="r")[a:b])
    lay = sf.npy or _npy_layout(sf.path)
    dtype = np.dtype(lay.dtype)
    m, w = b - a, dtype.itemsize
    if lay.fortran and lay.d > 1:   # column j holds rows 0..n-1 of dimension j
        starts = [lay.offset + (j * lay.n + a) * w for j in range(lay.d)]
        ends = [s + m * w for s in starts]
    else:
        starts, ends = [lay.offset + a * lay.d * w], [lay.offset + b * lay.d * w]
    chunks = _read_ranges(sf.path, starts, ends)
    for s, e, c in zip(starts, ends, chunks):
        if len(c) != e - s:
            raise InputError(f"{sf.path}: truncated .npy: rows [{a}, {b}) need bytes [{s}, {e}) "
                             f"but only {len(c)} of them exist; re-export it")
    if lay.fortran and lay.d > 1:
        return np.stack([np.frombuffer(c, dtype) for c in chunks], axis=1)
    return np.frombuffer(chunks[0], dtype).reshape(m, lay.d)


def _read_vecs(sf: SourceFile, a: int, b: int, d: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Records [a, b) of a .?vecs file -> (m, d) values and (record, reason) for bad headers."""
    dtype, width = VEC_FORMATS[sf.fmt]
    rec = 4 + d * width
    raw = storage.read_range(sf.path, a * rec, b * rec)  # exactly this range (one GET on S3)
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(b - a, rec)
    dims = arr[:, :4].copy().view("<i4").reshape(-1)
    bad = [(a + int(i), f"record header says dim {int(dims[i])}, expected {d} (mixed dims)")
           for i in np.flatnonzero(dims != d)]
    return arr[:, 4:].copy().view(dtype).reshape(b - a, d), bad


def _read_idx(sf: SourceFile, a: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray | None]:
    hdr, _ = _idx_header(sf.path)
    with _open(sf.path) as f:
        f.seek(hdr + a * d)  # gzip seeks by decompressing forward: bounded memory
        x = np.frombuffer(f.read((b - a) * d), dtype=np.uint8).reshape(b - a, d)
    y = None
    if sf.labels_path:
        lh, _ = _idx_header(sf.labels_path)
        with _open(sf.labels_path) as f:
            f.seek(lh + a)
            y = np.frombuffer(f.read(b - a), dtype=np.uint8).astype(np.int64)
    return x, y


def _read_parquet(src: Source, sf: SourceFile, a: int, b: int):
    """Rows [a, b) of a Parquet file, reading only the row groups that overlap."""
    fs, p = storage.filesystem(sf.path)
    pf = pq.ParquetFile(p, filesystem=fs)
    cols = [src.vector_column] + [c for c in (src.label_column, src.id_column) if c]
    for c in cols:
        if c not in pf.schema_arrow.names:
            raise InputError(f"{sf.path}: no column {c!r} (columns: {pf.schema_arrow.names})")
    pieces, start = [], 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if start < b and start + n > a:
            try:
                t = pf.read_row_group(rg, columns=cols)
            except (OSError, pa.ArrowException) as e:
                raise InputError(f"{sf.path}: row group {rg} (rows {start}..{start + n - 1}) cannot "
                                 f"be read ({e}): the file is corrupt or truncated; re-export "
                                 f"it") from None
            pieces.append(t.slice(max(a - start, 0), min(b, start + n) - max(a, start)))
        start += n
    t = pa.concat_tables(pieces) if pieces else pf.schema_arrow.empty_table().select(cols)
    vec = t.column(src.vector_column).combine_chunks()
    if not (pa.types.is_list(vec.type) or pa.types.is_large_list(vec.type)
            or pa.types.is_fixed_size_list(vec.type)):
        raise InputError(f"{sf.path}: column {src.vector_column!r} has type {vec.type}, expected "
                         f"a list of numbers")
    m = len(vec)
    bad: list[tuple[int, str]] = []
    x = np.zeros((m, src.dim), dtype=np.float32)
    if pa.types.is_fixed_size_list(vec.type):
        flat = vec.flatten()  # nulls inside a fixed-size list are rare; treat null rows below
        good = np.ones(m, bool)
        if vec.null_count:
            good = ~np.asarray(vec.is_null().to_numpy(zero_copy_only=False))
            vec = vec.filter(pa.array(good))
            flat = vec.flatten()
        vals = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32)
        x[good] = vals.reshape(-1, src.dim)
        lens = np.where(good, src.dim, -1)
    else:
        lens = np.asarray(pa.compute.list_value_length(vec).fill_null(-1).to_numpy(
            zero_copy_only=False))
        good = lens == src.dim
        vals = np.asarray(vec.filter(pa.array(good)).flatten().to_numpy(zero_copy_only=False),
                          dtype=np.float32)
        x[good] = vals.reshape(-1, src.dim)
    for i in np.flatnonzero(lens != src.dim):
        why = "null vector" if lens[i] < 0 else f"vector has {lens[i]} values, expected {src.dim} (ragged)"
        bad.append((a + int(i), why))
    labels = t.column(src.label_column).combine_chunks() if src.label_column else None
    sids = t.column(src.id_column).combine_chunks() if src.id_column else None
    return x, bad, labels, sids


def read_rows(src: Source, start: int, stop: int) -> Rows:
    """Global rows [start, stop) of the input, validated; bad rows are listed in `rejects`."""
    xs, ids, labels, sids, rejects = [], [], [], [], []
    for sf in src.files:
        a, b = max(start, sf.offset) - sf.offset, min(stop, sf.offset + sf.n_rows) - sf.offset
        if a >= b:
            continue
        bad: list[tuple[int, str]] = []
        lab: Any = None
        sid: Any = None
        if sf.fmt == "builtin":
            from sklearn.datasets import load_digits
            ds = load_digits()
            x, lab = ds.data[a:b], pa.array(ds.target[a:b].astype(np.int64))
        elif sf.fmt == "npy":
            x = _read_npy(sf, a, b)
        elif sf.fmt in VEC_FORMATS:
            x, bad = _read_vecs(sf, a, b, src.dim)
        elif sf.fmt == "idx":
            x, y = _read_idx(sf, a, b, src.dim)
            lab = None if y is None else pa.array(y)
        else:
            x, bad, lab, sid = _read_parquet(src, sf, a, b)
        x = np.ascontiguousarray(x, dtype=np.float32)  # also converts byte order and memory order
        ok = np.ones(len(x), bool)
        for rec, why in bad:
            ok[rec - a] = False
            rejects.append((sf.offset + rec, sf.path, rec, why))
        nonfinite = np.flatnonzero(ok & ~np.isfinite(x).all(axis=1))
        for i in nonfinite:
            ok[i] = False
            rejects.append((sf.offset + a + int(i), sf.path, a + int(i), "vector holds NaN or Inf"))
        if sid is not None:
            sid = sid.cast(src.source_id_type)
            if pa.types.is_integer(sid.type):
                neg = np.asarray(pa.compute.fill_null(pa.compute.less(sid, 0), False))
                for i in np.flatnonzero(ok & neg):
                    ok[i] = False
                    rejects.append((sf.offset + a + int(i), sf.path, a + int(i),
                                    f"negative id {sid[int(i)].as_py()} in column {src.id_column!r}"))
        if lab is not None and src.label_type is not None and lab.type != src.label_type:
            try:
                lab = lab.cast(src.label_type)
            except pa.ArrowInvalid as e:
                raise InputError(f"{sf.path}: label column {src.label_column!r} has type {lab.type}, "
                                 f"not castable to {src.label_type} of the first file ({e})") from None
        all_ok = bool(ok.all())  # the common case: no copy of the block
        xs.append(x if all_ok else x[ok])
        ids.append(np.arange(sf.offset + a, sf.offset + b, dtype=np.int64)[ok])
        if lab is not None:
            labels.append(lab if all_ok else lab.filter(pa.array(ok)))
        if sid is not None:
            sids.append(sid if all_ok else sid.filter(pa.array(ok)))
    rejects.sort()
    return Rows(_join(ids, np.zeros(0, np.int64)), _join(xs, np.zeros((0, src.dim), np.float32)),
                pa.concat_arrays(labels) if labels else None,
                pa.concat_arrays(sids) if sids else None, rejects)


def _join(pieces: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    """np.concatenate without the copy when there is one piece."""
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else empty


def read_source_ids(src: Source, start: int, stop: int) -> pa.Array:
    """The input id column (src.id_column) of global rows [start, stop), as src.source_id_type."""
    pieces = []
    for sf in src.files:
        a, b = max(start, sf.offset) - sf.offset, min(stop, sf.offset + sf.n_rows) - sf.offset
        if a >= b:
            continue
        fs, p = storage.filesystem(sf.path)
        pf = pq.ParquetFile(p, filesystem=fs)
        first = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if first < b and first + n > a:
                col = pf.read_row_group(rg, columns=[src.id_column]).column(0)
                pieces.append(col.slice(max(a - first, 0), min(b, first + n) - max(a, first)))
            first += n
    chunks = [c for p in pieces for c in p.chunks]
    return pa.chunked_array(chunks, type=src.source_id_type).combine_chunks().cast(src.source_id_type)


def locate(src: Source, row: int) -> tuple[str, int]:
    """(file, record within the file) of a global row position."""
    for sf in src.files:
        if sf.offset <= row < sf.offset + sf.n_rows:
            return sf.path, row - sf.offset
    raise IndexError(row)
