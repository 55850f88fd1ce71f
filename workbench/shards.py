"""Tensors larger than memory: :func:`write_shards` tensorizes chunk by chunk into ``.npy``
shards on disk, :class:`ShardedTensors` reads rows of them back (normalized) for training,
scoring and explanation by batch.

The tensorization is :func:`workbench.features.fit_transform_chunked` (or
``transform_chunked`` with a saved spec): ``fit_transform`` run on chunks of subjects through
the same functions (the same events query, code statistics, dense assembly and normalization),
so the shards hold the same tensor (``tests/test_shards.py``). The dense [N, T, F] tensor never
exists in memory; the passes are:

1. **the events, once**: samples are sorted by subject and cut into chunks of at most
   ``chunk_samples`` samples, at event-file ends where the data allow (MEDS keeps each subject
   in one file; each file's subject range comes from its parquet statistics, so a chunk reads
   only its files); each chunk's events go through the streaming query of ``fit_transform`` to
   its (sample, step, code) bins, spilled to a temporary Arrow file, and to per-code train
   counts. Chunks hold disjoint subjects, so their counts add up to the train split's and code
   selection is exactly ``fit``'s.
2. **the bins, once**: each chunk's raw tensor (NaN where nothing is known yet) is assembled,
   its train rows feed the streaming statistics (exact medians by a two-level radix count of the
   values' bits; means and stds by merged sums, equal to numpy's to float64 rounding) and it is
   written as one shard, in a background thread while the next chunk is assembled.
3. **the train rows of the shards, once more**, only for the low 16 bits of the medians.

Shard format (one folder, replaced atomically when complete): ``manifest.json`` (shape, the
shards and their row counts, the feature names, split counts), ``feature_spec.json``,
``samples.parquet`` (one row per sample, in shard order: ``sample_index`` = the label's row,
``subject_id``, ``prediction_time``, ``boolean_value``, ``split``) and ``X-00000.npy`` ... : the
raw tensor of each chunk, float32 [n, T, F], before imputation and standardization, with the
last channel (``step/observed``) holding 1 observed, 0 not observed, -1 left padding. The reader
applies the spec (:func:`workbench.features.apply_spec`, elementwise, so the values are bitwise
``fit_transform``'s) to every block it returns. Why not normalize the shards once the statistics
are known: that rewrites the whole tensor, and beyond the page cache's dirty limit writes go at
disk speed (about 330 MB/s measured on this project's machine: 18 s more per 6 GB at 100M events).

Memory: two chunks' events queries and one raw tensor with its temporaries (a few times
``chunk_samples * T * F * 4`` bytes), the chunk being written, the per-sample metadata (about 50
bytes a sample) and the statistics' counters (4 MB per imputed channel), whatever the number of
samples: 0.69 GB peak RSS at 100M events, T=48, F=32 (``benchmarks/bench_scale.py``). Rows are read with ``pread`` into the caller's batch,
not through a memory map, so reading never grows the process's resident memory by the pages
it has touched (an epoch touches every page of the train split).

Order: the shards hold the samples sorted by ``subject_id`` (stably, so a subject's samples stay
in label order); ``sample_index`` maps each row back to its label. For labels sorted by subject
(as :mod:`workbench.tasks` writes them) that is the label order, and :meth:`ShardedTensors.load`
returns what ``fit_transform`` returns.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from workbench import features as ft
from workbench.data.meds_io import MedsDataset
from workbench.errors import WorkbenchError
from workbench.files import replace_directory, temporary_directory_for

SHARDS_MANIFEST = "manifest.json"
SAMPLES_FILE = "samples.parquet"
SHARD_FORMAT = "workbench-raw-shards"


# ------------------------------------------------------------------------------------- writing


def _decode_padding(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(observed, padded) [n, T] from raw shard rows (see the module docstring)."""
    last = X[..., -1]
    return last > 0, last < 0


def shard_file(k: int) -> str:
    """The file name of shard ``k``."""
    return f"X-{k:05d}.npy"


def encode_padding(X: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """A raw chunk as a shard stores it, in place: the observed channel 1 observed, 0 not, -1 left padding."""
    X[..., -1][padded] = -1.0
    return X


def write_store_files(directory: Path, spec: ft.FeatureSpec, samples: pl.DataFrame,
                      shards: Sequence[tuple[str, int]]) -> None:
    """The files besides the shards (``(file, rows)`` in order) that make ``directory`` a store."""
    spec.save(directory / ft.SPEC_FILE)
    samples.write_parquet(directory / SAMPLES_FILE)
    manifest = {
        "format": SHARD_FORMAT, "version": 1, "shape": [samples.height, spec.config.n_steps, spec.n_features],
        "shards": [{"file": f, "rows": r} for f, r in shards],
        "feature_names": spec.feature_names, "splits": ft.split_counts(samples["split"].to_numpy()),
    }
    (directory / SHARDS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


class _ShardSink(ft.RawChunkSink):
    """Each raw chunk becomes one ``X-#####.npy``, written in a background thread while the next
    chunk is computed; at most one waits to be written, so memory holds at most two chunks."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.row_shape: tuple[int, int] | None = None
        self.files: list[str] = []
        self.rows: list[int] = []
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def write(self, k: int, X: np.ndarray, observed: np.ndarray, padded: np.ndarray) -> None:
        encode_padding(X, padded)
        self.wait()
        self.row_shape = X.shape[1:]
        while len(self.files) <= k:
            self.files.append(shard_file(len(self.files)))
            self.rows.append(0)
        self.rows[k] = len(X)
        self.pending = self.pool.submit(np.save, self.directory / self.files[k], X)

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.wait()
        reader = _ShardReader([self.directory / self.files[k]], [self.rows[k]], self.row_shape)
        try:
            X = reader.read(np.arange(self.rows[k]))
        finally:
            reader.close()
        return X, _decode_padding(X)[1]

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def write_shards(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
                 out: str | os.PathLike, config: ft.FeatureConfig | None = None, *,
                 spec: ft.FeatureSpec | str | os.PathLike | None = None, splits: pl.DataFrame | None = None,
                 chunk_samples: int = ft.DEFAULT_CHUNK_SAMPLES, progress: bool = False) -> "ShardedTensors":
    """Tensorize ``labels`` on ``dataset`` into shards under ``out`` (replaced when complete).

    Without ``spec``, a FeatureSpec is fitted on the train split (``config``, default
    FeatureConfig(); ``splits`` as in :func:`~workbench.features.fit_transform`): the sharded
    ``fit_transform``. With ``spec``, it is applied as :func:`~workbench.features.transform`
    does (one pass, nothing fitted). ``chunk_samples`` bounds the samples per chunk and shard.
    """
    if spec is not None and config is not None:
        raise WorkbenchError("write_shards: give a config to fit or a spec to apply, not both")
    if chunk_samples < 1:
        raise WorkbenchError(f"write_shards: chunk_samples must be >= 1, got {chunk_samples}")
    if spec is not None and not isinstance(spec, ft.FeatureSpec):
        spec = ft.FeatureSpec.load(spec)
    out = Path(out)
    tmp = temporary_directory_for(out)
    try:
        sink = _ShardSink(tmp)
        bar = _progress(progress)
        try:
            if spec is None:
                spec, samples = ft.fit_transform_chunked(dataset, labels, sink, config, splits,
                                                         chunk_samples=chunk_samples, progress=bar.update)
            else:
                samples = ft.transform_chunked(dataset, labels, spec, sink, chunk_samples=chunk_samples,
                                               progress=bar.update)
        finally:
            sink.close()
            bar.close()
        write_store_files(tmp, spec, samples, list(zip(sink.files, sink.rows)))
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardedTensors(out)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc="shards", unit="chunk-pass")


# ------------------------------------------------------------------------------------- reading


class _ShardReader:
    """Rows of raw ``.npy`` shards read with ``pread`` (no memory map: reading never leaves the
    touched pages in the process's resident memory)."""

    def __init__(self, paths: Sequence[Path], rows: Sequence[int], row_shape: tuple[int, int]):
        self.paths = [Path(p) for p in paths]
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(rows, dtype=np.int64))])
        self.row_shape = tuple(int(n) for n in row_shape)
        self.row_bytes = self.row_shape[0] * self.row_shape[1] * 4
        self._fds: dict[int, int] = {}
        self._headers: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def ranges(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _open(self, s: int) -> tuple[int, int]:
        if s not in self._fds:
            path = self.paths[s]
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                if version not in ((1, 0), (2, 0)):
                    raise WorkbenchError(f"{path}: .npy format version {version} is not a shard's")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                expected = (int(self.offsets[s + 1] - self.offsets[s]), *self.row_shape)
                if tuple(shape) != expected or fortran or dtype != np.float32:
                    raise WorkbenchError(f"{path}: shard holds {dtype} {shape}, expected float32 {expected}")
                self._headers[s] = fh.tell()
            self._fds[s] = os.open(path, os.O_RDONLY)
        return self._fds[s], self._headers[s]

    def read(self, index: np.ndarray) -> np.ndarray:
        """Raw rows ``index`` (store rows, any order, repeats allowed) as float32 [len(index), T, F]."""
        index = np.asarray(index, dtype=np.int64).ravel()
        n = len(index)
        if n and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"rows out of range 0..{len(self) - 1}")
        ordered = n < 2 or bool(np.all(index[1:] >= index[:-1]))
        order = None if ordered else np.argsort(index, kind="stable")
        rows = index if ordered else index[order]
        buffer = np.empty((n, *self.row_shape), dtype=np.float32)
        if n:
            shard = np.searchsorted(self.offsets, rows, side="right") - 1
            # one read per run of consecutive rows within a shard
            breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shard) != 0)) + 1
            flat = buffer.reshape(n, -1)
            for a, b in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [n]]).tolist()):
                s = int(shard[a])
                fd, header = self._open(s)
                offset = header + int(rows[a] - self.offsets[s]) * self.row_bytes
                view = memoryview(flat[a:b]).cast("B")
                done = 0
                while done < len(view):
                    got = os.preadv(fd, [view[done:]], offset + done)
                    if got <= 0:
                        raise WorkbenchError(f"{self.paths[s]}: shard is shorter than its manifest says")
                    done += got
        if ordered:
            return buffer
        result = np.empty_like(buffer)
        result[order] = buffer
        return result

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardedTensors:
    """A folder written by :func:`write_shards`: per-sample metadata in memory, the tensor on disk.

    ``read(index)`` returns the normalized X rows (as ``fit_transform`` would hold them) and
    ``read(index, with_observed=True)`` also the ``observed`` mask; ``view(split)`` gives rows that
    :func:`workbench.training.train` and :func:`~workbench.training.predict_risk` read by batch;
    ``load(index)`` gives a :class:`~workbench.features.SequenceTensors` (e.g. the sequences to explain).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / SHARDS_MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise WorkbenchError(f"{manifest_path}: cannot read a shards manifest ({exc})") from None
        if manifest.get("format") != SHARD_FORMAT:
            raise WorkbenchError(f"{manifest_path}: not a {SHARD_FORMAT} manifest")
        self.spec = ft.FeatureSpec.load(self.root / ft.SPEC_FILE)
        self.samples = pl.read_parquet(self.root / SAMPLES_FILE)
        self.shape = tuple(manifest["shape"])
        shards = manifest["shards"]
        if self.samples.height != self.shape[0] or sum(s["rows"] for s in shards) != self.shape[0]:
            raise WorkbenchError(f"{self.root}: samples, shards and manifest disagree on the number of rows")
        if list(manifest["feature_names"]) != self.spec.feature_names or self.shape[2] != self.spec.n_features:
            raise WorkbenchError(f"{self.root}: manifest and feature spec disagree on the channels")
        self._reader = _ShardReader([self.root / s["file"] for s in shards], [s["rows"] for s in shards],
                                    self.shape[1:])
        self.y = self.samples["boolean_value"].cast(pl.Float32).to_numpy().astype(np.float32)
        self.split = self.samples["split"].to_numpy().astype(str)
        self.subject_id = self.samples["subject_id"].to_numpy().astype(np.int64)
        self.sample_index = self.samples["sample_index"].to_numpy().astype(np.int64)

    @property
    def feature_names(self) -> list[str]:
        return list(self.spec.feature_names)

    def __len__(self) -> int:
        return self.shape[0]

    def shard_ranges(self) -> list[tuple[int, int]]:
        """The store rows ``(start, stop)`` of each shard, in order."""
        return self._reader.ranges()

    def rows(self, split: str) -> np.ndarray:
        """Store rows (sorted) of the samples in ``split``."""
        return np.flatnonzero(self.split == split)

    def read(self, index, with_observed: bool = False):
        """Normalized X [len(index), T, F] float32 for store rows ``index`` (any order), with the
        ``observed`` mask [len(index), T] too when asked."""
        X = self._reader.read(np.asarray(index, dtype=np.int64))
        observed, padded = _decode_padding(X)
        ft.apply_spec(X, padded, self.spec)
        return (X, observed) if with_observed else X

    def observed(self, index) -> np.ndarray:
        return self.read(index, with_observed=True)[1]

    def view(self, rows: str | np.ndarray) -> "ShardRows":
        """The rows of a split (by name) or given store rows, read on demand."""
        return ShardRows(self, self.rows(rows) if isinstance(rows, str) else np.asarray(rows, dtype=np.int64))

    def load(self, index=None) -> ft.SequenceTensors:
        """In-memory SequenceTensors of store rows ``index`` (all rows when None: only for data that fit)."""
        index = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64)
        X, observed = self.read(index, with_observed=True)
        return ft.sequence_tensors(X, observed, self.samples[index], self.spec)

    def iter_blocks(self, rows: np.ndarray, block: int = 4096):
        """(rows, X, observed) blocks of ``rows`` in order: scoring or explaining everything by batch."""
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            X, observed = self.read(part, with_observed=True)
            yield part, X, observed

    def close(self) -> None:
        self._reader.close()

    def __del__(self):
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()


@dataclass
class ShardRows:
    """Some rows of a :class:`ShardedTensors`, read on demand: ``len``, ``shape`` and
    ``read_rows(positions)`` (normalized float32), which is what training and scoring ask of a
    sequence source that is not an array."""

    store: ShardedTensors
    index: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.index), *self.store.shape[1:])

    @property
    def y(self) -> np.ndarray:
        return self.store.y[self.index]

    def read_rows(self, positions) -> np.ndarray:
        """X of rows ``positions`` (0..len-1 within this view, any order)."""
        return self.store.read(self.index[np.asarray(positions, dtype=np.int64)])

    def observed(self, positions) -> np.ndarray:
        return self.store.observed(self.index[np.asarray(positions, dtype=np.int64)])
