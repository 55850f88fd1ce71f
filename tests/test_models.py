"""Sequence models (fused recurrent layer, save/load, input gradients) and the two references."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pydantic import ValidationError

from workbench.errors import WorkbenchError
from workbench.models import (
    FusedRecurrent,
    ModelConfig,
    SequenceModelParts,
    build_model,
    logit_function,
    split_sequence_model,
)
from workbench.references import MAYO_FEATURES, LogisticReference, mayo_inputs_from_features, mayo_pbc_score

import keras  # after a workbench import: workbench/__init__.py chooses the torch backend
import torch

T, F = 8, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sequences(n=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, T, F)).astype(np.float32)


@pytest.mark.parametrize(
    "field, value",
    [("kind", "transformer"), ("units", 0), ("layers", 0), ("dropout", 1.0), ("recurrent_dropout", -0.1),
     ("head_units", -1), ("learning_rate", 0.0), ("no_such_field", 1)],
)
def test_model_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        ModelConfig(**{field: value})
    assert field in str(err.value)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_build_model_gives_a_risk_per_sequence(kind, bidirectional):
    config = ModelConfig(kind=kind, units=6, layers=2, bidirectional=bidirectional, head_units=3)
    model = build_model(config, T, F, seed=0)
    risk = keras.ops.convert_to_numpy(model(sequences()))
    assert model.name == f"{kind}_risk"
    assert risk.shape == (32, 1)
    assert np.all((risk > 0) & (risk < 1))
    assert all(isinstance(model.get_layer(f"{kind}_{i}"), FusedRecurrent) for i in (1, 2))


def test_recurrent_dropout_falls_back_to_keras_layer():
    model = build_model(ModelConfig(kind="gru", units=4, recurrent_dropout=0.2), T, F, seed=0)
    assert isinstance(model.get_layer("gru_1"), keras.layers.GRU)


def test_fused_lstm_computes_what_keras_lstm_computes():
    """Same weights, same outputs: the fused layer is a standard LSTM, and with
    bidirectional=True it concatenates [forward last state, backward last state] as Keras does."""
    x = sequences(16)
    for bidirectional in (False, True):
        keras_lstm = keras.layers.LSTM(5)
        reference = keras.layers.Bidirectional(keras_lstm) if bidirectional else keras_lstm
        expected = keras.ops.convert_to_numpy(reference(x))
        fused = FusedRecurrent("lstm", units=5, bidirectional=bidirectional)
        fused.build((None, T, F))
        cells = [reference.forward_layer, reference.backward_layer] if bidirectional else [keras_lstm]
        with torch.no_grad():
            for cell, suffix in zip(cells, ["", "_reverse"]):
                kernel, recurrent, bias = (keras.ops.convert_to_numpy(w) for w in cell.weights)
                params = dict(fused.torch_module().named_parameters())
                params[f"weight_ih_l0{suffix}"].copy_(torch.from_numpy(kernel.T))
                params[f"weight_hh_l0{suffix}"].copy_(torch.from_numpy(recurrent.T))
                params[f"bias_ih_l0{suffix}"].copy_(torch.from_numpy(bias))
                params[f"bias_hh_l0{suffix}"].zero_()
        np.testing.assert_allclose(keras.ops.convert_to_numpy(fused(x)), expected, atol=1e-5)


@pytest.mark.parametrize("kind, layers, head_units", [("lstm", 1, 0), ("gru", 2, 3), ("rnn", 2, 0)])
def test_split_model_runs_from_a_saved_state_as_the_whole_model(kind, layers, head_units):
    """The recurrence run over a prefix, then from its states over the rest, then the head: the model's output."""
    model = build_model(ModelConfig(kind=kind, units=5, layers=layers, head_units=head_units), T, F, seed=0)
    parts = split_sequence_model(model)
    assert isinstance(parts, SequenceModelParts)
    assert len(parts.recurrent) == layers and len(parts.head) == 1 + (head_units > 0)
    x = torch.from_numpy(sequences(6))
    with torch.no_grad():
        expected = model(x, training=False)
        features, _ = parts.run_recurrence(x)
        np.testing.assert_allclose(parts.head_risk(features).numpy(), expected.numpy(), atol=1e-6)
        _, prefix_states = parts.run_recurrence(x[:, :3])
        rows = torch.tensor([5, 0, 2])
        features, _ = parts.run_recurrence(x[rows, 3:], parts.select_states(prefix_states, rows))
        np.testing.assert_allclose(parts.head_risk(features).numpy(), expected[rows].numpy(), atol=1e-6)
        logit = parts.head_logit(features)
        np.testing.assert_allclose(torch.sigmoid(logit).numpy(), expected[rows].numpy(), atol=1e-6)
        np.testing.assert_allclose(logit_function(model)(x[rows]).numpy(), logit.numpy(), atol=1e-5)


def test_split_model_refuses_other_structures():
    assert split_sequence_model(build_model(ModelConfig(units=4, bidirectional=True), T, F)) is None
    assert split_sequence_model(build_model(ModelConfig(units=4, recurrent_dropout=0.2), T, F)) is None
    assert logit_function(build_model(ModelConfig(units=4, recurrent_dropout=0.2), T, F)) is not None
    assert split_sequence_model(torch.nn.Linear(2, 1)) is None and logit_function(torch.nn.Linear(2, 1)) is None
    inputs = keras.Input(shape=(T, F))
    linear_output = keras.layers.Dense(1)(FusedRecurrent("gru", units=3)(inputs))  # no sigmoid
    unsigmoided = keras.Model(inputs, linear_output)
    assert split_sequence_model(unsigmoided) is None and logit_function(unsigmoided) is None


def test_same_seed_same_initial_weights_other_seed_differs():
    config = ModelConfig(units=4)
    a, b, c = (build_model(config, T, F, seed=s) for s in (7, 7, 8))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_dropout_is_active_only_in_training():
    model = build_model(ModelConfig(units=4, dropout=0.5), T, F, seed=0)
    x = keras.ops.convert_to_tensor(sequences())
    infer = [keras.ops.convert_to_numpy(model(x, training=False)) for _ in range(2)]
    trained = keras.ops.convert_to_numpy(model(x, training=True))
    np.testing.assert_array_equal(infer[0], infer[1])
    assert not np.allclose(trained, infer[0])


def test_input_gradients_flow_to_every_step():
    """The explain module's GradientExplainer needs d risk / d input through torch autograd."""
    model = build_model(ModelConfig(units=4, bidirectional=True), T, F, seed=0)
    x = torch.tensor(sequences(4), requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == (4, T, F)
    assert torch.all(x.grad.abs().sum(dim=(0, 2)) > 0)  # every time step influences the risk


def test_trained_model_saves_and_loads_in_a_fresh_process(tmp_path):
    x = sequences()
    model = build_model(ModelConfig(kind="gru", units=4, layers=2, head_units=3), T, F, seed=0)
    before_training = model.predict(x, verbose=0)
    model.fit(x, (x[:, -1, 0] > 0).astype(np.float32), epochs=2, batch_size=8, verbose=0)
    expected = model.predict(x, verbose=0)
    assert not np.allclose(expected, before_training)  # so a load that re-initializes would fail
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import numpy as np
        import workbench.models  # registers FusedRecurrent; workbench/__init__.py selects the torch backend
        import keras
        model = keras.models.load_model({str(tmp_path / "model.keras")!r})
        np.save({str(tmp_path / "loaded.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), expected)


def tabular_problem(n: int = 1200, seed: int = 1):
    """Tabular features as workbench.tabular names them: the outcome follows an old diagnosis
    (seen only through its whole-history count) and the last value of a lab, sometimes missing."""
    rng = np.random.default_rng(seed)
    names = ["LAB//a/last@30d", "LAB//a/mean@30d", "LAB//a/last@full", "LAB//a/count@full",
             "DX//x/count@30d", "DX//x/count@full", "static/age_years", "static/SEX//F"]
    X = np.full((n, len(names)), np.nan, dtype=np.float32)
    lab = rng.normal(size=n)
    seen = rng.uniform(size=n) < 0.8
    X[seen, 2] = lab[seen]
    X[:, 3] = seen
    X[:, 0] = np.where(rng.uniform(size=n) < 0.3, X[:, 2], np.nan)
    X[:, 1] = rng.normal(size=n)  # noise, and not an input of the logistic reference
    old_dx = rng.uniform(size=n) < 0.3
    X[:, 4], X[:, 5] = 0, old_dx * rng.integers(1, 4, n)
    X[:, 6], X[:, 7] = rng.uniform(40, 80, n), rng.uniform(size=n) < 0.5
    logit = -2 + 2.5 * old_dx + 1.2 * np.where(seen, lab, 0)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y, names


def test_logistic_reference_reads_the_whole_history_and_chooses_c_on_tuning():
    from sklearn.metrics import roc_auc_score

    X, y, names = tabular_problem()
    ref = LogisticReference(names).fit(X[:800], y[:800], X[800:1000], y[800:1000])
    assert ref.names == ["LAB//a/last@full", "static/age_years", "static/SEX//F", "LAB//a/last@full/missing",
                         "static/age_years/missing", "DX//x/ever"]
    assert ref.C in LogisticReference.C_GRID and ref.tuning_auroc == pytest.approx(
        roc_auc_score(y[800:1000], ref.predict_proba(X[800:1000])))
    assert roc_auc_score(y[1000:], ref.predict_proba(X[1000:])) > 0.75  # the old diagnosis counts
    noise = X.copy()
    noise[:, [0, 1, 4]] = 123.0  # window aggregates are not its inputs
    np.testing.assert_array_equal(ref.predict_proba(noise), ref.predict_proba(X))
    from workbench.calibration import Recalibration

    before = ref.predict_proba(X)
    ref.fold_platt(0.7, -0.4)
    np.testing.assert_allclose(ref.predict_proba(X), Recalibration(method="platt", a=0.7, b=-0.4).apply(before), rtol=1e-9)


def test_gradient_boosted_reference_stops_on_tuning_and_saves_as_text(tmp_path):
    from sklearn.metrics import roc_auc_score

    from workbench.references import GradientBoostedReference

    X, y, _ = tabular_problem()
    gbt = GradientBoostedReference(seed=3).fit(X[:800], y[:800], X[800:1000], y[800:1000])
    assert 0 < gbt.booster.best_iteration < gbt.max_rounds
    assert roc_auc_score(y[1000:], gbt.predict_proba(X[1000:])) > 0.75
    gbt.save(tmp_path / "gbt.txt")
    assert (tmp_path / "gbt.txt").read_text().startswith("tree")
    np.testing.assert_allclose(GradientBoostedReference.load(tmp_path / "gbt.txt").predict_proba(X), gbt.predict_proba(X))
    again = GradientBoostedReference(seed=3).fit(X[:800], y[:800], X[800:1000], y[800:1000])
    np.testing.assert_array_equal(again.predict_proba(X), gbt.predict_proba(X))  # deterministic


def test_mayo_score_matches_the_published_formula():
    raw = {
        "bilirubin": np.array([1.0, np.e, 2.0]),
        "albumin": np.array([1.0, 1.0, 3.5]),
        "protime": np.array([1.0, 1.0, 10.0]),
        "age": np.array([50.0, 0.0, 60.0]),
        "edema": np.array([0.0, 1.0, 0.5]),
    }
    expected_third = 0.871 * np.log(2.0) - 2.53 * np.log(3.5) + 0.039 * 60 + 2.38 * np.log(10.0) + 0.859 * 0.5
    np.testing.assert_allclose(mayo_pbc_score(raw), [0.039 * 50, 0.871 + 0.859, expected_third])


def test_mayo_score_propagates_missing_and_rejects_non_positive_labs():
    raw = {k: np.array([1.0, 1.0]) for k in MAYO_FEATURES}
    raw["albumin"] = np.array([np.nan, 1.0])
    assert np.isnan(mayo_pbc_score(raw)[0]) and np.isfinite(mayo_pbc_score(raw)[1])
    raw["protime"] = np.array([1.0, 0.0])
    with pytest.raises(WorkbenchError, match="protime"):
        mayo_pbc_score(raw)


def test_mayo_inputs_are_picked_by_feature_name():
    names = ["EXAM//edema/last", "LAB//bilirubin/last", "static/age_years", "LAB//protime/last",
             "LAB//albumin/last", "LAB//ast/last"]
    raw_last = np.arange(12, dtype=float).reshape(2, 6)
    picked = mayo_inputs_from_features(raw_last, names)
    np.testing.assert_array_equal(picked["bilirubin"], [1.0, 7.0])
    np.testing.assert_array_equal(picked["edema"], [0.0, 6.0])
    with pytest.raises(WorkbenchError, match="LAB//albumin/last"):
        mayo_inputs_from_features(raw_last[:, :4], names[:4])
