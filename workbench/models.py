"""Risk models: recurrent networks over SequenceTensors.

Sequence models (Keras 3 on the torch backend) read ``X`` [N, T, F], left-padded with zeros
so the last step is the most recent, and output a risk in [0, 1] of shape [N, 1].

Why a fused layer: Keras's own LSTM/GRU/SimpleRNN under the torch backend runs a Python loop
per time step on CPU (about 4x slower than ``torch.nn.LSTM``), and reaches cuDNN on GPU only
without a mask. :class:`FusedRecurrent` runs ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` instead
(oneDNN on CPU, cuDNN on GPU) with its weights tracked as Keras variables, so the model is
still a Keras model (fit, predict, ``.keras`` save, MLflow's Keras flavor) and still a
``torch.nn.Module`` (autograd to the inputs for SHAP). There is no Masking layer: padding
steps are zeros and come first, so the network learns to pass over them, and a mask would
take cuDNN away on GPU. The fused kernels cannot apply recurrent dropout; a config asking
for it gets Keras's own layer (correct, slower).

:func:`split_sequence_model` splits such a model into its recurrent layers and its Dense head,
each runnable alone (the recurrence from a saved state, the head on features, to its logit or
its risk), and :func:`logit_function` reads a model's pre-sigmoid output: what
:mod:`workbench.explain` needs, without reaching into the layers.

The references every comparison shows live in :mod:`workbench.references` (no torch there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

# Keras reads KERAS_BACKEND at its first import; workbench/__init__.py (which runs before this
# module) sets it to workbench.KERAS_BACKEND, torch.
import keras
import torch

from workbench.errors import WorkbenchError
from workbench.settings import ModelConfig

# Estimators pickled before the references moved out name their class here (workbench.models.X).
from workbench.references import GradientBoostedReference, LogisticReference  # noqa: F401


_TORCH_MODULES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
_KERAS_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}
# Rows per unit in torch's stacked gate matrices (LSTM: i, f, g, o; GRU: r, z, n).
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}




@keras.saving.register_keras_serializable(package="workbench")
class FusedRecurrent(keras.layers.Layer):
    """One recurrent layer run by torch's fused kernel, with Keras-tracked weights.

    Args:
        kind: "lstm", "gru" or "rnn" (tanh SimpleRNN).
        units: hidden units per direction.
        dropout: fraction of input features dropped in training, one mask per sequence
            (the same meaning as Keras's ``LSTM(dropout=...)``).
        bidirectional: run a backward pass too; outputs have ``2 * units`` features.
        return_sequences: return [N, T, units] instead of the last state [N, units].
        seed: seeds the weight initializers and the dropout masks.

    Weights start as Keras's recurrent layers start theirs (Glorot-uniform input kernel,
    orthogonal recurrent kernel, zero bias, LSTM forget-gate bias 1). Torch backend only.
    """

    def __init__(
        self,
        kind: str = "lstm",
        units: int = 64,
        dropout: float = 0.0,
        bidirectional: bool = False,
        return_sequences: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if keras.backend.backend() != "torch":
            raise WorkbenchError(f"FusedRecurrent needs KERAS_BACKEND=torch, not {keras.backend.backend()!r}")
        if kind not in _TORCH_MODULES:
            raise WorkbenchError(f"FusedRecurrent kind must be one of {sorted(_TORCH_MODULES)}, not {kind!r}")
        self.kind = kind
        self.units = units
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.return_sequences = return_sequences
        self.seed = seed
        self.dropout_seeds = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        """Create the torch module; the wrapper exposes its parameters as Keras variables."""
        module = _TORCH_MODULES[self.kind](
            input_size=input_shape[-1], hidden_size=self.units, batch_first=True, bidirectional=self.bidirectional
        )
        self._initialize_like_keras(module)
        # TorchModuleWrapper saves/loads the module's state_dict as this layer's weights;
        # the module itself is rebuilt here from get_config, so no pickle is involved.
        self.torch_rnn = keras.layers.TorchModuleWrapper(module, name=f"torch_{self.kind}")

    def _initialize_like_keras(self, module: torch.nn.Module) -> None:
        """Keras's recurrent initializers (better than torch's uniform for long sequences)."""
        gates = _GATES[self.kind]
        seed = 0 if self.seed is None else self.seed
        with torch.no_grad():
            for i, (name, param) in enumerate(module.named_parameters()):
                if name.startswith("weight_ih"):
                    init = keras.initializers.GlorotUniform(seed=seed + i)
                elif name.startswith("weight_hh"):
                    init = keras.initializers.Orthogonal(seed=seed + i)
                else:
                    param.zero_()
                    if self.kind == "lstm" and name.startswith("bias_ih"):
                        param[self.units : 2 * self.units] = 1.0  # unit forget bias
                    continue
                # Keras kernels are [inputs, gates * units]; torch stores the transpose.
                kernel = init((param.shape[1], gates * self.units))
                param.copy_(torch.as_tensor(keras.ops.convert_to_numpy(kernel)).T)

    def torch_module(self) -> torch.nn.Module:
        """The ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` this layer runs (``batch_first``; built layers only).

        Its parameters are this layer's weights, so calling it, optionally from an initial
        state, computes what the layer computes outside training (no dropout).
        """
        if not self.built:
            raise WorkbenchError(f"FusedRecurrent {self.name!r} has no torch module before it is built")
        return self.torch_rnn.module

    def call(self, inputs, training=None):
        if training and self.dropout > 0:
            n, _, f = inputs.shape
            inputs = keras.random.dropout(inputs, self.dropout, noise_shape=(n, 1, f), seed=self.dropout_seeds)
        # Call the module directly: it has no train/eval-dependent parts (one layer, no
        # inter-layer dropout), and skipping the wrapper's Keras call saves per-step overhead.
        outputs, state = self.torch_rnn.module(inputs)
        if self.return_sequences:
            return outputs
        hidden = state[0] if self.kind == "lstm" else state  # [directions, N, units]
        # Forward direction's state after the last step; backward's after the first.
        return torch.cat(list(hidden), dim=-1)

    def compute_output_shape(self, input_shape):
        width = self.units * (2 if self.bidirectional else 1)
        if self.return_sequences:
            return (input_shape[0], input_shape[1], width)
        return (input_shape[0], width)

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "units": self.units,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
            "return_sequences": self.return_sequences,
            "seed": self.seed,
        }


def recurrent_layer(config: ModelConfig, index: int, return_sequences: bool, seed: int) -> keras.layers.Layer:
    """The ``index``-th recurrent layer: fused torch kernel, or Keras's own when recurrent dropout is on."""
    name = f"{config.kind}_{index + 1}"
    if config.recurrent_dropout == 0.0:
        return FusedRecurrent(
            kind=config.kind,
            units=config.units,
            dropout=config.dropout,
            bidirectional=config.bidirectional,
            return_sequences=return_sequences,
            seed=seed + 1000 * index,
            name=name,
        )
    layer = _KERAS_LAYERS[config.kind](
        config.units,
        dropout=config.dropout,
        recurrent_dropout=config.recurrent_dropout,
        return_sequences=return_sequences,
        seed=seed + 1000 * index,
        name=name,
    )
    return keras.layers.Bidirectional(layer, name=f"bi_{name}") if config.bidirectional else layer


def build_model(config: ModelConfig, n_steps: int, n_features: int, seed: int = 0) -> keras.Model:
    """A compiled Keras model mapping [N, n_steps, n_features] to a risk [N, 1].

    ``seed`` fixes every initial weight (Keras's global seed is also set, for layers that
    draw from it). The model is named for its kind, e.g. ``lstm_risk``.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(n_steps, n_features), name="sequence")
    x = inputs
    for i in range(config.layers):
        x = recurrent_layer(config, i, return_sequences=i < config.layers - 1, seed=seed)(x)
    if config.head_units:
        dense_init = keras.initializers.GlorotUniform(seed=seed + 1)
        x = keras.layers.Dense(config.head_units, activation="relu", kernel_initializer=dense_init, name="risk_features")(x)
    risk_init = keras.initializers.GlorotUniform(seed=seed + 2)
    risk = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=risk_init, name="risk")(x)
    model = keras.Model(inputs, risk, name=f"{config.kind}_risk")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
    )
    return model


def dense_logit(layer: keras.layers.Dense, features: torch.Tensor) -> torch.Tensor:
    """A Dense layer's pre-activation ``features @ kernel + bias`` [N, units] (torch backend)."""
    logit = features @ layer.kernel.value
    return logit if layer.bias is None else logit + layer.bias.value


def _is_sigmoid_dense(layer) -> bool:
    return isinstance(layer, keras.layers.Dense) and getattr(layer.activation, "__name__", "") == "sigmoid"


def logit_function(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's pre-sigmoid output [N, units] as a differentiable torch function of its input,
    when ``model`` is a Keras model whose last layer is a Dense with a sigmoid; else None.

    Reading the pre-activation avoids ``log(p / (1 - p))`` on a float32 probability, which
    saturates at 0 and 1.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(model, keras.Model) or not layers or not _is_sigmoid_dense(layers[-1]):
        return None
    last = layers[-1]
    features = keras.Model(model.inputs, last.input)

    def logit(x: torch.Tensor) -> torch.Tensor:
        return dense_logit(last, features(x, training=False))

    return logit


# The final state of one recurrent layer, as torch returns it: h_n [directions, N, units], or
# (h_n, c_n) for an LSTM.
RecurrentState = torch.Tensor | tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class SequenceModelParts:
    """A built sequence model split into its recurrent layers and its Dense head, each runnable alone.

    The model is ``Input -> FusedRecurrent* -> Dense* -> Dense(sigmoid)``, a plain chain of
    unidirectional layers (see :func:`split_sequence_model`). Running :meth:`run_recurrence`
    then :meth:`head_risk` computes the model's risk (outside training); the recurrence can
    also start from the states a previous call returned, e.g. after a shared prefix of steps.
    """

    recurrent: tuple[FusedRecurrent, ...]
    head: tuple[keras.layers.Dense, ...]  # the last one has a sigmoid

    def run_recurrence(
        self, x: torch.Tensor, states: Sequence[RecurrentState | None] | None = None
    ) -> tuple[torch.Tensor, list[RecurrentState]]:
        """Run the recurrent layers over ``x`` [N, S, F] (S >= 1), layer i starting from ``states[i]``.

        ``states`` None (or a None entry) starts from the zero state. Returns the last layer's
        output at the last step [N, units] (the features the head reads) and every layer's
        final state, to continue from.
        """
        h, final = x, []
        for i, layer in enumerate(self.recurrent):
            h, state = layer.torch_module()(h, None if states is None else states[i])
            final.append(state)
        return h[:, -1], final  # last step's output = final hidden state of a unidirectional layer

    @staticmethod
    def select_states(states: Sequence[RecurrentState], rows: torch.Tensor) -> list[RecurrentState]:
        """The states of the sequences ``rows`` (indices into the N of :meth:`run_recurrence`)."""
        # torch's states are [layers * directions, N, units] (LSTM: a pair of them).
        return [tuple(t[:, rows] for t in s) if isinstance(s, tuple) else s[:, rows] for s in states]

    def head_logit(self, features: torch.Tensor) -> torch.Tensor:
        """The head's pre-sigmoid output [N, 1] on recurrent features [N, units]."""
        h = features
        for layer in self.head[:-1]:
            h = layer(h)
        return dense_logit(self.head[-1], h)

    def head_risk(self, features: torch.Tensor) -> torch.Tensor:
        """The head's risk [N, 1] (the sigmoid of :meth:`head_logit`) on recurrent features [N, units]."""
        return self.head[-1].activation(self.head_logit(features))


def split_sequence_model(model) -> SequenceModelParts | None:
    """The recurrent layers and Dense head of ``model``, or None unless it is exactly
    ``Input -> FusedRecurrent* -> Dense* -> Dense(sigmoid)``: one input and output, each layer
    reading the previous one's output, no bidirectional layer, every recurrent layer but the
    last returning sequences (what :func:`build_model` builds without recurrent dropout).
    """
    if not isinstance(model, keras.Model) or len(getattr(model, "inputs", None) or []) != 1 or len(model.outputs) != 1:
        return None
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    n_rec = next((i for i, layer in enumerate(layers) if not isinstance(layer, FusedRecurrent)), len(layers))
    recurrent, head = layers[:n_rec], layers[n_rec:]
    if not recurrent or not head or not all(isinstance(layer, keras.layers.Dense) for layer in head):
        return None
    if any(r.bidirectional or r.return_sequences != (i < len(recurrent) - 1) for i, r in enumerate(recurrent)):
        return None
    if not _is_sigmoid_dense(head[-1]):
        return None
    # A plain chain: each layer reads exactly the previous layer's output.
    chain = [model.inputs[0]] + [layer.output for layer in layers]
    if any(layer.input is not chain[i] for i, layer in enumerate(layers)) or model.outputs[0] is not chain[-1]:
        return None
    return SequenceModelParts(tuple(recurrent), tuple(head))


def fold_platt(model: keras.Model, a: float, b: float) -> None:
    """Fold the Platt map ``sigmoid(a * logit(p) + b)`` into the sigmoid output layer (in place):
    ``sigmoid(a (w.h + c) + b) = sigmoid((a w).h + (a c + b))``, so the model outputs calibrated risk."""
    layer = model.get_layer("risk")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * a, bias * a + b])
