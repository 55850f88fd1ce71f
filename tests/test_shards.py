"""Sharded tensors: the same tensors as fit_transform, the same training as on arrays, bounded reads."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from workbench import features as ft
from workbench.data.synth import SynthConfig, generate, read_ground_truth
from workbench.errors import WorkbenchError
from workbench.models import ModelConfig
from workbench.shards import ShardedTensors, write_shards
from workbench.training import SequenceBatches, TrainConfig, predict_risk, train

# every channel kind: numeric aggregations, missing, time_since, counts, history, age, static
FULL = ft.FeatureConfig(bin_width="30d", n_steps=12, numeric_aggs=["last", "mean", "min", "max"],
                        add_missing_indicators=True, add_time_since_last=True, min_code_frequency=0.05)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """600 subjects in 4 files of 150; labels one per subject, sorted by subject (as tasks write them)."""
    root = tmp_path_factory.mktemp("shards") / "synth"
    generate(root, SynthConfig(n_subjects=600, seed=5, subjects_per_shard=150, mean_events_per_subject=40),
             progress=False)
    labels = read_ground_truth(root).select("subject_id", "prediction_time", pl.col("outcome").alias("boolean_value"))
    return root, labels


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.UnseenCodesWarning)
        return fn(*args, **kwargs)


def assert_same_tensors(ref: ft.SequenceTensors, got: ft.SequenceTensors) -> None:
    """Bitwise equal arrays; the spec equal but for mean/std, which are summed in another order."""
    np.testing.assert_array_equal(got.X, ref.X)  # bitwise: NaN never appears, equal floats only
    assert got.X.dtype == ref.X.dtype == np.float32
    for name in ("y", "subject_id", "prediction_time", "step_end_time", "observed", "split"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert got.feature_names == ref.feature_names
    assert got.spec.model_dump(exclude={"mean", "std"}) == ref.spec.model_dump(exclude={"mean", "std"})
    np.testing.assert_allclose(got.spec.mean, ref.spec.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.spec.std, ref.spec.std, rtol=1e-12)


@pytest.mark.parametrize("config", [ft.FeatureConfig(n_steps=24, bin_width="14d"), FULL], ids=["default", "every-channel"])
@pytest.mark.parametrize("chunk_samples", [10_000, 150, 97], ids=["one-chunk", "per-file", "files-split"])
def test_shards_hold_what_fit_transform_returns(tmp_path, synth, config, chunk_samples):
    root, labels = synth
    spec, ref = quiet(ft.fit_transform, root, labels, config)
    store = quiet(write_shards, root, labels, tmp_path / "shards", config, chunk_samples=chunk_samples)
    # chunks end at file ends (4 files of 150 subjects) unless a file has more samples than a chunk
    assert len(store._reader.paths) == {10_000: 1, 150: 4, 97: 8}[chunk_samples]
    np.testing.assert_array_equal(store.sample_index, np.arange(600))  # labels sorted by subject: same order
    assert_same_tensors(ref, store.load())
    # a saved and reopened store reads the same rows, in any order, repeated too
    again = ShardedTensors(tmp_path / "shards")
    index = np.array([599, 0, 17, 17, 300, 151, 150, 149])
    X, observed = again.read(index, with_observed=True)
    np.testing.assert_array_equal(X, ref.X[index])
    np.testing.assert_array_equal(observed, ref.observed[index])
    np.testing.assert_array_equal(again.read(np.array([], dtype=np.int64)), ref.X[:0])


def test_subjects_with_several_samples_stay_whole_in_a_chunk(tmp_path, synth):
    """Two prediction times per subject, chunks smaller than one subject's samples: a chunk is
    never cut inside a subject (the code counts use each subject's latest sample)."""
    root, labels = synth
    some = labels.filter(pl.col("subject_id") % 10 == 0)
    earlier = some.with_columns(pl.col("prediction_time") - pl.duration(days=60))
    both = pl.concat([some, earlier]).sort("subject_id", "prediction_time")
    _, ref = quiet(ft.fit_transform, root, both, FULL)
    store = quiet(write_shards, root, both, tmp_path / "shards", FULL, chunk_samples=1)
    assert len(store._reader.paths) == some.height  # one subject (two samples) per chunk
    assert_same_tensors(ref, store.load())


def test_unsorted_labels_keep_their_rows_through_sample_index(tmp_path, synth):
    root, labels = synth
    shuffled = labels.sample(fraction=1.0, shuffle=True, seed=1)
    _, ref = quiet(ft.fit_transform, root, shuffled, FULL)
    store = quiet(write_shards, root, shuffled, tmp_path / "shards", FULL, chunk_samples=128)
    assert (np.diff(store.subject_id) >= 0).all()  # shards are in subject order
    assert_same_tensors(ref.subset(store.sample_index), store.load())


def test_a_wrong_layout_guess_is_redone_and_late_train_chunks_wait(tmp_path, synth):
    """Chunks are assembled with the codes the first train chunk chooses while the rest is read:
    a code frequent there but not overall (or the reverse) makes every chunk go again; chunks read
    before any train sample are read again once there is a guess."""
    root, labels = synth
    config = ft.FeatureConfig(n_steps=12, bin_width="30d", min_code_frequency=50)  # a count of subjects
    _, ref = quiet(ft.fit_transform, root, labels, config)
    ticks = []
    spec, samples = quiet(ft.fit_transform_chunked, root, labels, _ListSink(), config, chunk_samples=150,
                          progress=lambda: ticks.append(1))
    assert len(ticks) == 2 * 4  # the first file's subjects choose fewer codes: a second pass
    assert spec.model_dump(exclude={"mean", "std"}) == ref.spec.model_dump(exclude={"mean", "std"})
    splits = pl.read_parquet(root / "metadata/subject_splits.parquet").with_columns(
        pl.when(pl.col("subject_id").rank() <= 300).then(pl.lit("tuning")).otherwise("split").alias("split"))
    _, ref = quiet(ft.fit_transform, root, labels, FULL, splits)
    store = quiet(write_shards, root, labels, tmp_path / "late", FULL, splits=splits, chunk_samples=150)
    assert_same_tensors(ref, store.load())


class _ListSink(ft.RawChunkSink):
    def __init__(self):
        self.chunks = {}

    def write(self, k, X, observed, padded):
        self.chunks[k] = (X.copy(), padded.copy())

    def read(self, k):
        return self.chunks[k]


def test_a_saved_spec_is_applied_chunk_by_chunk_as_transform_does(tmp_path, synth):
    root, labels = synth
    spec, _ = quiet(ft.fit_transform, root, labels, FULL)
    held = labels.filter(pl.col("subject_id") % 3 == 0)
    ref = quiet(ft.transform, root, held, spec)
    store = quiet(write_shards, root, held, tmp_path / "shards", spec=spec, chunk_samples=50)
    got = store.load()
    assert got.spec == spec
    np.testing.assert_array_equal(got.X, ref.X)
    np.testing.assert_array_equal(got.observed, ref.observed)
    with pytest.raises(WorkbenchError, match="not both"):
        write_shards(root, held, tmp_path / "other", FULL, spec=spec)


def test_output_is_replaced_only_when_complete(tmp_path, synth):
    root, labels = synth
    out = tmp_path / "shards"
    quiet(write_shards, root, labels, out, FULL, chunk_samples=200)
    before = sorted(p.name for p in out.iterdir())
    no_train = labels.join(pl.read_parquet(root / "metadata/subject_splits.parquet"), on="subject_id").filter(
        pl.col("split") != "train").drop("split")
    with pytest.raises(WorkbenchError, match="train"):
        write_shards(root, no_train, out, FULL)
    assert sorted(p.name for p in out.iterdir()) == before  # the old shards are untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards.")]  # no temporaries left


def test_streaming_statistics_equal_the_in_memory_ones():
    """Exact medians (ties, -0.0, a channel never observed), mean/std to float64 rounding, any chunking."""
    rng = np.random.default_rng(0)
    names = ["a/last", "b/last", "c/count", ft.AGE_FEATURE, "d/missing", "e/days_since_last", "f/last", "step/observed"]
    N, T = 900, 10
    X = rng.normal(50, 10, size=(N, T, len(names))).astype(np.float32)
    X[..., 1] = rng.integers(0, 5, size=(N, T))
    X[rng.random(X.shape) < 0.3] = np.nan
    X[..., 2] = rng.poisson(0.3, size=(N, T))
    X[..., 6] = np.nan
    X[:5, :, 0] = -0.0
    padded = np.zeros((N, T), dtype=bool)
    padded[:, :3] = rng.random((N, 1)) < 0.5
    rows = rng.random(N) < 0.6
    with pytest.warns(UserWarning, match="f/last"):
        ref = ft._fit_statistics(X.copy(), padded, rows, names)
    X_moved = X.copy()
    X_moved[:100, :, 0] += 1000  # the first chunk's median is far from the final one: a second look
    with pytest.warns(UserWarning, match="f/last"):
        ref_moved = ft._fit_statistics(X_moved.copy(), padded, rows, names)
    # (a second look is needed when a first chunk's median is off by more than 3 bins; None: may be)
    for data, expected, chunk, second_look in ((X, ref, N, False), (X, ref, 100, None), (X, ref, 7, None),
                                               (X_moved, ref_moved, 100, True)):
        stats = ft._StreamingStatistics(names)
        for i in range(0, N, chunk):
            stats.add(data[i:i + chunk], padded[i:i + chunk], rows[i:i + chunk])
        assert second_look is None or stats.needs_low == second_look
        for i in range(0, N, chunk):
            stats.add_low(data[i:i + chunk], padded[i:i + chunk], rows[i:i + chunk])
        with pytest.warns(UserWarning, match="f/last"):
            median, mean, std = stats.result()
        assert median == expected[0]
        np.testing.assert_allclose(mean, expected[1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(std, expected[2], rtol=1e-12)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, synth):
    root, labels = synth
    config = ft.FeatureConfig(n_steps=16, bin_width="21d")
    _, ref = quiet(ft.fit_transform, root, labels, config)
    store = quiet(write_shards, root, labels, tmp_path_factory.mktemp("stored") / "shards", config, chunk_samples=100)
    return ref, store


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_training_from_shards_is_training_from_arrays(stored, class_weight):
    """Same seed, same batches (SequenceBatches shuffles as Keras does arrays): same history, same weights."""
    ref, store = stored
    model, config = ModelConfig(units=8, dropout=0.2), TrainConfig(epochs=2, batch_size=64, progress=False, seed=3,
                                                                    class_weight=class_weight)
    tr, tu = ref.by_split("train"), ref.by_split("tuning")
    on_arrays = train(model, config, tr.X, tr.y, tu.X, tu.y)
    train_rows, tune_rows = store.view("train"), store.view("tuning")
    on_shards = train(model, config, train_rows, train_rows.y, tune_rows, tune_rows.y)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(on_shards.history) == strip(on_arrays.history)
    for a, b in zip(on_shards.model.get_weights(), on_arrays.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    held = store.view("held_out")
    np.testing.assert_array_equal(predict_risk(on_shards.model, held, batch_size=50),
                                  predict_risk(on_arrays.model, ref.by_split("held_out").X, batch_size=50))


def test_batches_cover_every_row_once_per_epoch(stored):
    _, store = stored
    rows = store.view("train")
    batches = SequenceBatches(rows, rows.y, batch_size=64)
    seen = []
    for i in range(len(batches)):
        x, y = batches[i]
        assert x.shape[1:] == rows.shape[1:] and len(x) == len(y) <= 64
        seen.append(batches._order[i * 64:(i + 1) * 64])
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(rows)))


def test_bad_values_in_a_source_fail_naming_the_split(stored):
    ref, _ = stored

    class Rows:
        def __init__(self, X):
            self.X, self.shape = X, X.shape

        def __len__(self):
            return len(self.X)

        def read_rows(self, positions):
            return self.X[positions]

    tr, tu = ref.by_split("train"), ref.by_split("tuning")
    bad = tr.X.copy()
    bad[3, 2, 1] = np.nan
    with pytest.raises(WorkbenchError, match="train X contains NaN"):
        train(ModelConfig(units=4), TrainConfig(epochs=1, progress=False), Rows(bad), tr.y, Rows(tu.X), tu.y)


def test_a_damaged_store_is_refused(tmp_path, stored):
    _, store = stored
    with pytest.raises(WorkbenchError, match="manifest"):
        ShardedTensors(tmp_path)
    with pytest.raises(IndexError):
        store.read([len(store)])
