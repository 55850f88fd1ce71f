"""SHAP per time step for sequence risk models: fast expected gradients, an exact reference, checks.

Three things live here, one per section:

1. **Attributions** (:func:`explain`, :func:`iter_explanations`): SHAP values per cell
   [N, T, F] by *expected gradients* (the method of shap's ``GradientExplainer``), summed to
   per-step totals [N, T] and per-feature totals [N, F], with each sample's model output and
   base value.
2. **An exact reference** (:func:`exact_step_shap`): Shapley values with the *time steps* as
   players, a masked step replaced by the background's value at that step (TimeSHAP's game),
   estimated by shap's ``PermutationExplainer`` (antithetic permutations, exactly additive) or
   ``KernelExplainer`` (TimeSHAP's method). Costly; meant for a few samples.
3. **Checks** (:func:`check_explanation`): additivity, agreement of the fast path with the
   reference, and a deletion test, as a flat ``dict[str, float]`` ready to log as metrics;
   :func:`check_verdicts` turns them into PASS / WARN rows against thresholds in
   :class:`ExplainConfig`, and :func:`verdict_tags` into MLflow tags.

Why our own expected-gradients loop rather than ``shap.GradientExplainer``: shap draws, for
every evaluation, an i.i.d. background row and an i.i.d. interpolation point ``alpha`` and
reports the mean output over the *whole* background as the base value. Its attributions then
miss additivity by the Monte-Carlo error of both draws (``benchmarks.bench_explain``,
2026-12-03: 43% mean at 200 evaluations per sequence, still 3.4% at 12,800). Here every
sequence uses *every* background row, and the default ``adaptive`` scheme places the ``alpha`` values where the output changes: a
forward-only grid on every path (``path_grid`` cells, about a third of the cost of a gradient
evaluation each) finds where the output moves, and the gradient draws are spread over all
(background row, grid cell) pairs in proportion to that change (importance sampling,
stratified, weighted by 1 / density, so still unbiased): paths along which the output barely
moves give their draws to the ones where it jumps, which is where the error comes from. The
expectation is the same as shap's; ``tests/test_explain.py`` checks our values against shap's
on a small case.

Completeness regression (``completeness="regression"``, the default): the total of the
attributions has a known true value, ``output - base``, and each draw's total is a noisy
estimate of it. Regressing every cell's per-draw contribution on the draw's total and
correcting by the known error of the total (a regression control variate,
:func:`completeness_regression`) removes the part of each cell's error that moves with the
total's; on the benchmark's LSTM the cell-level error against a 4,096-draw estimate fell by
about a quarter (2.3% to 1.7% mean), at no extra model evaluation, and the result sums to
``output - base`` exactly (on a model whose output moves smoothly the gain is small). So the
returned values' additivity error is float rounding, and the sampling error is reported instead as ``Explanation.sampling_residual``: the uncorrected estimate's miss,
what an uncorrected expected-gradients estimator (shap's) would show as its additivity error.

Speed: every path point of a sequence shares its padded prefix, so sequences are grouped by
padding length and, for the workbench's recurrent models (fused recurrent layers then Dense
layers), the recurrent state after the prefix is computed once and only the real steps are
run. The model's weights are frozen while explaining so autograd computes only the input
gradient (weight gradients would cost as much again). Gradient passes are small
(``gradient_rows_per_pass``, 128 rows: on CPU the recurrent intermediates then stay in cache,
about 1.5x faster per row than 4,096-row passes), forward-only passes large, and the length
groups run on ``torch.get_num_threads()`` threads of one torch thread each (small passes do
not split well over intra-op threads, and those spin-wait when another process holds a core).

Padding: ``X`` is left-padded (padded steps are all-zero rows before a sequence's first
observed step). Each explained sequence gets its *own* baselines: the background rows with
the steps where that sequence is padded set to the sequence's own (pad) values. Then
``x - baseline`` is exactly zero on padded steps, so expected gradients give them exactly zero
attribution, and the reference game holds them fixed (they are not players). The base value
therefore depends on the sequence's padding and is reported per sample.

Output space: attributions sum to the model's output minus the base value in the space named
by ``ExplainConfig.output_space``. The default is ``"probability"`` (the risk the model
outputs), because that is the number an analyst reads on the timeline ("this visit raised
the risk by 0.12"); ``"logit"`` explains the log-odds (the sigmoid's pre-activation, read
exactly from the model's final Dense layer when it has one). The deletion test measures the
change in whichever space the attributions sum in.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from workbench.errors import WorkbenchError
from workbench.settings import ExplainConfig, OutputSpace
from workbench.record import EXPLAIN_CHECK_TAG_PREFIX, EXPLAIN_VERDICT_TAG


# Relative additivity errors divide by |output - base|; below this floor (in output units)
# the difference is too small for a ratio to mean anything, so the floor is the divisor.
ADDITIVITY_FLOOR = 1e-3
# Probabilities are clipped this far from 0 and 1 before a logit when the model's own
# pre-activation is not reachable.
_LOGIT_EPS = 1e-6




@dataclasses.dataclass
class Explanation:
    """SHAP values for a set of sequences, at cell, step and feature level.

    ``sum(shap[i]) ~= output[i] - base_value[i]`` in ``output_space``. ``index`` holds each
    row's position in the ``X`` that was explained (streamed batches carry their slice).
    """

    shap: np.ndarray  # [N, T, F] float32
    step_totals: np.ndarray  # [N, T] float32: shap summed over features
    feature_totals: np.ndarray  # [N, F] float32: shap summed over steps
    output: np.ndarray  # [N] float64: model output in output_space
    base_value: np.ndarray  # [N] float64: mean output over this sequence's baselines
    index: np.ndarray  # [N] int64
    output_space: str = "probability"
    # [N] float64: what the attributions summed to *before* the completeness regression, minus
    # (output - base_value): the sampling error of the draws (None when not recorded).
    sampling_residual: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.output)

    @classmethod
    def concat(cls, parts: Sequence["Explanation"]) -> "Explanation":
        """One explanation from streamed batches, in order."""
        if not parts:
            raise WorkbenchError("Explanation.concat needs at least one batch")
        fields = ("shap", "step_totals", "feature_totals", "output", "base_value", "index")
        arrays = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
        residuals = [p.sampling_residual for p in parts]
        residual = None if any(r is None for r in residuals) else np.concatenate(residuals)
        return cls(**arrays, output_space=parts[0].output_space, sampling_residual=residual)


# --------------------------------------------------------------------------------------
# Model access: outputs and input gradients in the chosen output space
# --------------------------------------------------------------------------------------


def _as_output_vector(y: torch.Tensor) -> torch.Tensor:
    """[N] from a model output of shape [N] or [N, 1]."""
    if y.ndim == 2 and y.shape[1] == 1:
        return y[:, 0]
    if y.ndim == 1:
        return y
    raise WorkbenchError(f"explanations need one output per sequence ([N] or [N, 1]); the model returned {tuple(y.shape)}")


def output_function(model, output_space: OutputSpace = "probability") -> Callable[[torch.Tensor], torch.Tensor]:
    """A differentiable torch function mapping [R, T, F] to outputs [R] in ``output_space``.

    ``model`` is a Keras model on the torch backend or a ``torch.nn.Module`` returning a
    probability of shape [R, 1] or [R].
    """
    call = (lambda x: model(x, training=False)) if _is_keras(model) else model
    if output_space == "probability":
        return lambda x: _as_output_vector(call(x))
    if output_space == "logit":
        # The model's own pre-sigmoid output when it has one (a logit of the float32
        # probability saturates at 0 and 1).
        from workbench.models import logit_function

        head = logit_function(model)
        if head is not None:
            return lambda x: _as_output_vector(head(x))
        return lambda x: torch.logit(_as_output_vector(call(x)), eps=_LOGIT_EPS)
    raise WorkbenchError(f"output_space must be 'probability' or 'logit', not {output_space!r}")


def _is_keras(model) -> bool:
    import keras

    return isinstance(model, keras.Model)


@contextlib.contextmanager
def frozen_weights(model):
    """Turn off weight gradients while explaining: autograd then computes only d output / d input."""
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def evaluate(fn: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray, rows_per_pass: int = 4096) -> np.ndarray:
    """Outputs [R] (float64) of ``fn`` on X [R, T, F], without gradients, in passes of ``rows_per_pass``."""
    out = np.empty(len(X), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(X), rows_per_pass):
            chunk = torch.from_numpy(np.ascontiguousarray(X[start : start + rows_per_pass], dtype=np.float32))
            out[start : start + len(chunk)] = fn(chunk).double().numpy()
    return out


class _ConcatPrefix:
    """Any model as f(prefix, suffix): the shared padded prefix is kept and concatenated back.

    Every point on a sequence's paths shares the sequence's padded steps (x - baseline is zero
    there), so the explainer evaluates only the suffix of real steps plus a per-row state.
    For a model of unknown structure the state is the prefix itself: nothing is saved, but
    the explainer needs only one code path.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def prefix_state(self, prefix: torch.Tensor):
        """State after the prefix [m, L, F], one per sequence."""
        return prefix

    @staticmethod
    def select(state, rows: torch.Tensor):
        """The state of each row's sequence (rows index the m sequences)."""
        return state[rows]

    def __call__(self, suffix: torch.Tensor, state) -> torch.Tensor:
        return self.fn(torch.cat([state, suffix], dim=1))


class _RecurrentPrefix:
    """A stack of unidirectional fused recurrent layers plus Dense layers, run from a saved state.

    The recurrent state after the padded prefix is computed once per sequence and every path
    point starts from it, so the recurrent kernels run only over the real steps (on the
    benchmark's data 62% of the steps): the same arithmetic as the whole model, minus the
    repeated prefix. Used only when :func:`workbench.models.split_sequence_model` splits the
    model and the split reproduces the model's outputs (checked on probe rows when built).
    """

    def __init__(self, parts, output_space: OutputSpace):
        self.parts, self.output_space = parts, output_space  # parts: workbench.models.SequenceModelParts

    def prefix_state(self, prefix: torch.Tensor):
        if prefix.shape[1] == 0:
            return None
        _, states = self.parts.run_recurrence(prefix)
        return states

    def select(self, state, rows: torch.Tensor):
        return None if state is None else self.parts.select_states(state, rows)

    def __call__(self, suffix: torch.Tensor, state) -> torch.Tensor:
        features, _ = self.parts.run_recurrence(suffix, state)
        if self.output_space == "logit":
            return _as_output_vector(self.parts.head_logit(features))
        return _as_output_vector(self.parts.head_risk(features))


def prefix_runner(model, fn: Callable[[torch.Tensor], torch.Tensor], output_space: OutputSpace, probe: np.ndarray):
    """The fastest exact way to evaluate ``fn`` on (prefix state, suffix) for this model.

    ``probe`` [P, T, F] rows check the recurrent shortcut against ``fn`` (split mid-sequence);
    a model it does not reproduce to 1e-5 gets the generic runner.
    """
    from workbench.models import split_sequence_model

    parts = split_sequence_model(model)
    if parts is None:
        return _ConcatPrefix(fn)
    runner = _RecurrentPrefix(parts, output_space)
    x = torch.from_numpy(np.ascontiguousarray(probe, dtype=np.float32))
    split = x.shape[1] // 2
    with torch.no_grad():
        state = runner.prefix_state(x[:, :split])
        ok = torch.allclose(runner(x[:, split:], state), fn(x), rtol=1e-4, atol=1e-5)
    return runner if ok else _ConcatPrefix(fn)


# --------------------------------------------------------------------------------------
# Padding and baselines
# --------------------------------------------------------------------------------------


def padded_steps(X: np.ndarray, observed: np.ndarray | None = None) -> np.ndarray:
    """[N, T] bool: the left padding, i.e. the steps before each sequence's first observed step.

    With ``observed`` given, a step is padding when no earlier-or-equal step is observed (an
    unobserved gap inside the history is real input to the model, not padding). Without it,
    padding is the leading run of all-zero rows.
    """
    if observed is None:
        observed = np.any(X != 0, axis=2)
    observed = np.asarray(observed, dtype=bool)
    if observed.shape != X.shape[:2]:
        raise WorkbenchError(f"observed has shape {observed.shape}; expected {X.shape[:2]} to match X")
    return np.cumsum(observed, axis=1) == 0


def sample_baselines(x: np.ndarray, padded: np.ndarray, X_background: np.ndarray) -> np.ndarray:
    """[n, K, T, F] baselines: each background row with the sequence's padded steps set to its own values.

    Why per sequence: then ``x - baseline`` is zero on padded steps, so the padding gets no
    attribution, and the model never sees background history where the sequence has none.
    """
    return np.where(padded[:, None, :, None], x[:, None], X_background[None])


class _BaselineOutputs:
    """Outputs [n, K] at each sequence's baselines, computed once per distinct padded prefix.

    The baselines of a sequence depend only on its padded steps (length and values), so most
    sequences share them; their outputs give the base value and the alpha = 0 end of every path.
    """

    def __init__(self, fn, X_background: np.ndarray, rows_per_pass: int):
        self.fn, self.X_background, self.rows_per_pass = fn, X_background, rows_per_pass
        self.cache: dict[tuple[int, bytes], np.ndarray] = {}

    def __call__(self, x: np.ndarray, padded: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), len(self.X_background)))
        for i in range(len(x)):
            key = (int(padded[i].sum()), x[i][padded[i]].tobytes())
            if key not in self.cache:
                baselines = sample_baselines(x[i : i + 1], padded[i : i + 1], self.X_background)[0]
                self.cache[key] = evaluate(self.fn, baselines, self.rows_per_pass)
            out[i] = self.cache[key]
        return out


# --------------------------------------------------------------------------------------
# 1. Attributions: expected gradients with a stratified path sampling
# --------------------------------------------------------------------------------------


def alpha_design(n_background: int, per_background: int, scheme: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation points and weights [K, R] for one sequence (row k integrates from background k).

    ``stratified``: the K*R midpoints of [0, 1] shuffled over the (row, repeat) pairs, so
    every row is used R times and the alphas cover the path evenly across rows (low variance,
    no bias). ``gauss_legendre``: R Gauss-Legendre nodes on every row (exact quadrature of
    each row's path for smooth models as R grows). ``uniform``: i.i.d. alphas (shap's scheme).
    Weights sum to 1 over all K*R cells.
    """
    K, R = n_background, per_background
    if scheme == "stratified":
        grid = (rng.permutation(K * R) + 0.5) / (K * R)
        return grid.reshape(K, R), np.full((K, R), 1.0 / (K * R))
    if scheme == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(R)
        alphas = np.broadcast_to((nodes + 1) / 2, (K, R)).copy()
        return alphas, np.broadcast_to(weights / 2 / K, (K, R)).copy()
    if scheme == "uniform":
        return rng.uniform(size=(K, R)), np.full((K, R), 1.0 / (K * R))
    raise WorkbenchError(f"alpha_scheme must be stratified, gauss_legendre or uniform, not {scheme!r}")


def _cell_mass(change: np.ndarray, uniform_share: float) -> np.ndarray:
    """Probability per cell (last axis): |output change| share mixed with a uniform share."""
    C = change.shape[-1]
    total = change.sum(axis=-1, keepdims=True)
    shaped = np.divide(change, total, out=np.full_like(change, 1.0 / C), where=total > 0)
    return (1.0 - uniform_share) * shaped + uniform_share / C


def _row_draws(change: np.ndarray, total_draws: int, uniform_share: float, pooled: bool) -> np.ndarray:
    """Draws per background row [K]: equal, or (pooled) at least one plus a share by the path's output change.

    Fixed before any gradient is drawn, so each row is a stratum of its own and the estimate
    stays unbiased for any allocation; largest remainders make the counts sum to total_draws.
    """
    K = len(change)
    if not pooled or total_draws <= K:
        return np.full(K, max(1, total_draws // K))
    share = _cell_mass(change.sum(axis=1), uniform_share)
    target = (total_draws - K) * share
    draws = 1 + np.floor(target).astype(int)
    left = total_draws - draws.sum()
    draws[np.argsort(-(target - np.floor(target)), kind="stable")[:left]] += 1
    return draws


def _stratified_cells(mass: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``draws[k]`` cells from each row k of mass [K, C], one per stratum of [0, 1].

    Returns the row, the cell, the position within it in [0, 1) and the cell's mass, one
    entry per draw. Consecutive strata that land in one heavy cell split it evenly, so a cell
    with several draws is itself stratified.
    """
    rows = np.repeat(np.arange(len(mass)), draws)
    stratum = np.arange(len(rows)) - np.repeat(np.cumsum(draws) - draws, draws)
    u = (stratum + rng.uniform(size=len(rows))) / draws[rows]
    cdf = np.cumsum(mass, axis=1)
    cell = np.minimum((u[:, None] > cdf[rows]).sum(axis=1), mass.shape[1] - 1)
    cell_mass = mass[rows, cell]
    below = cdf[rows, cell] - cell_mass
    return rows, cell, np.clip((u - below) / cell_mass, 0.0, 1.0 - 1e-7), cell_mass


def adaptive_alphas(
    path_outputs: np.ndarray, per_background: int, uniform_share: float, rng: np.random.Generator, pooled: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Importance-sampled (row, alpha, weight) triples [K * per_background] from outputs on a grid along each path.

    ``path_outputs`` [K, G + 1] holds the model's output at alpha = 0, 1/G, ..., 1 on the path
    from background row k to the sequence. A trained risk model often changes its output in a
    narrow stretch of the path (a spike crossing a decision threshold); evenly spread alphas
    then mostly land where the gradient is zero and the estimate misses additivity badly. So
    alphas are drawn from a density proportional to |change of output| per grid cell, mixed
    with ``uniform_share`` of uniform density so every alpha stays possible, stratified, and
    weighted by 1 / density: an unbiased estimate of the same integral, exact for the
    attribution total when the output is monotone and the gradient constant within cells,
    and exact for a linear model (each row's weights sum to 1 / K).

    ``pooled``: rows along whose path the output barely moves give draws to the rows where it
    jumps (every row keeps at least one), since the error concentrates there; otherwise every
    row gets ``per_background`` draws.
    """
    K, G = path_outputs.shape[0], path_outputs.shape[1] - 1
    change = np.abs(np.diff(path_outputs, axis=1))  # [K, G]
    draws = _row_draws(change, K * per_background, uniform_share, pooled)
    rows, cell, within, cell_mass = _stratified_cells(_cell_mass(change, uniform_share), draws, rng)
    # Within row k the density of alpha is cell_mass * G; rows are averaged with weight 1 / K.
    return rows, (cell + within) / G, 1.0 / (draws[rows] * K * cell_mass * G)


def _flat_design(n_background: int, per_background: int, scheme: str, rng: np.random.Generator):
    """alpha_design as (row, alpha, weight) triples [K * R]."""
    alphas, weights = alpha_design(n_background, per_background, scheme, rng)
    return np.repeat(np.arange(n_background), per_background), alphas.ravel(), weights.ravel()


def _suffix_points(base: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """[m * A, S, F] inputs base + alpha * delta on the real steps, for rows/alphas [m, A] (rows pick a background)."""
    m, A = rows.shape
    seq = torch.arange(m)[:, None].expand(m, A)
    return (base[rows] + alphas[..., None, None] * delta[seq, rows]).reshape(m * A, *base.shape[1:])


def _grid_path_outputs(runner, state, base, delta, G: int, f0: np.ndarray, f1: np.ndarray, rows_per_pass: int = 4096) -> np.ndarray:
    """Outputs [m, K, G + 1] at alpha = 0, 1/G, ..., 1; the ends are known (baseline and sequence outputs).

    Forward only (no autograd), in passes of about ``rows_per_pass`` rows (at least one sequence).
    """
    m, K = delta.shape[:2]
    path = np.empty((m, K, G + 1))
    path[:, :, 0], path[:, :, G] = f0, f1[:, None]
    if G > 1:
        step = max(1, rows_per_pass // (K * (G - 1)))
        # Per sequence: row 0's interior alphas, then row 1's, ... (k-major, to reshape to [K, G - 1]).
        rows = torch.arange(K).repeat_interleave(G - 1).expand(step, -1)
        alphas = torch.linspace(0.0, 1.0, G + 1)[1:-1].repeat(K).expand(step, -1)
        with torch.inference_mode():
            for s in range(0, m, step):
                idx = torch.arange(s, min(m, s + step))
                points = _suffix_points(base, delta[idx], rows[: len(idx)], alphas[: len(idx)])
                out = runner(points, runner.select(state, idx.repeat_interleave(K * (G - 1))))
                path[s : s + len(idx), :, 1:G] = out.double().numpy().reshape(len(idx), K, G - 1)
    return path


def _path_gradients(runner, state, base, delta, rows, alphas, weights, rows_per_pass: int) -> tuple[torch.Tensor, ...]:
    """Attributions [m, S, F] from each sequence's draws (rows, alphas, weights [m, A]), with the
    sums the completeness regression needs: sum_j v_j s_j [m, S, F], sum_j s_j and sum_j s_j^2 [m].

    ``v_j`` is draw j's weighted contribution ``w_j * grad_j * delta_{row j}`` (the attributions
    are sum_j v_j) and ``s_j`` its total over cells. The m * A draws run in backward passes of
    ``rows_per_pass`` rows: on CPU a small pass keeps the recurrent intermediates in cache (on
    the benchmark's LSTM, 128-row passes took two thirds of the time per row of 4096-row passes).
    """
    m, A = rows.shape
    S, F = delta.shape[2:]
    phi = torch.zeros((m, S, F), dtype=torch.float64)
    vs = torch.zeros_like(phi)
    s_sum, s_sq = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    flat_rows, flat_alphas, flat_weights = rows.reshape(-1), alphas.reshape(-1), weights.reshape(-1)
    for start in range(0, m * A, rows_per_pass):
        j = torch.arange(start, min(m * A, start + rows_per_pass))
        seq, r = j // A, flat_rows[j]
        d = delta[seq, r]  # [n, S, F]
        points = (base[r] + flat_alphas[j, None, None] * d).requires_grad_(True)
        y = runner(points, runner.select(state, seq))
        (grads,) = torch.autograd.grad(y.sum(), points)
        v = (grads * flat_weights[j, None, None]).double() * d
        totals = v.sum(dim=(1, 2))  # s_j
        phi.index_add_(0, seq, v)
        vs.index_add_(0, seq, v * totals[:, None, None])
        s_sum.index_add_(0, seq, totals)
        s_sq.index_add_(0, seq, totals * totals)
    return phi, vs, s_sum, s_sq


def completeness_regression(phi: torch.Tensor, vs: torch.Tensor, s_sum: torch.Tensor, s_sq: torch.Tensor, A: int, target: torch.Tensor) -> torch.Tensor:
    """Regression control variate: attributions phi [m, S, F] moved to sum exactly to ``target`` [m].

    Each sequence's A draws give cell contributions v_j and totals s_j (sum_j v_j = phi); the
    total's true value, output - base, is known. Regressing every cell's contribution on the
    draw total (slope beta = cov(v, s) / var(s), over the draws) and adding
    ``beta * (target - sum_j s_j)`` is the classical regression estimator: it removes the part
    of each cell's sampling error that moves with the total's error, so cells that drove the
    output change get the correction, and since the slopes sum to one over the cells, the
    result sums to ``target`` exactly. On the benchmark's LSTM it cut the cell-level error
    against a 4,096-draw estimate by about a quarter at no extra model evaluation. A sequence
    whose draw totals do not vary (var(s) = 0: a linear model, or a single draw) is unchanged.
    """
    mean_s = s_sum / A
    var_s = s_sq - A * mean_s * mean_s  # sum of squared deviations
    cov = vs - mean_s[:, None, None] * phi  # sum_j (v_j - mean v)(s_j - mean s)
    ok = var_s > 1e-12 * torch.clamp(s_sq, min=1e-300)
    beta = torch.where(ok[:, None, None], cov / torch.where(ok, var_s, 1.0)[:, None, None], 0.0)
    return phi + beta * (target - s_sum)[:, None, None]


def _estimate(runner, state, base, delta, f0: np.ndarray, f1: np.ndarray, R: int, G: int, rngs, config: ExplainConfig) -> tuple[torch.Tensor, np.ndarray]:
    """One expected-gradients estimate [m, S, F] from K * R draws per sequence, placed by the configured
    scheme and (``completeness="regression"``) corrected by :func:`completeness_regression`, and
    the uncorrected estimate's miss [m] (its sum minus output - base: the sampling error)."""
    K = delta.shape[1]
    if config.alpha_scheme == "adaptive":
        path = _grid_path_outputs(runner, state, base, delta, G, f0, f1, config.max_rows_per_pass)
        designs = [adaptive_alphas(p, R, config.uniform_share, rng, config.adaptive_pooled) for p, rng in zip(path, rngs)]
    else:
        designs = [_flat_design(K, R, config.alpha_scheme, rng) for rng in rngs]
    rows = torch.from_numpy(np.stack([d[0] for d in designs]))  # [m, K * R]
    alphas = torch.from_numpy(np.stack([d[1] for d in designs]).astype(np.float32))
    weights = torch.from_numpy(np.stack([d[2] for d in designs]).astype(np.float32))
    phi, vs, s_sum, s_sq = _path_gradients(runner, state, base, delta, rows, alphas, weights, config.gradient_rows_per_pass)
    target = torch.from_numpy(np.asarray(f1, dtype=np.float64) - np.asarray(f0, dtype=np.float64).mean(axis=1))
    residual = (s_sum - target).numpy()
    if config.completeness == "regression":
        phi = completeness_regression(phi, vs, s_sum, s_sq, rows.shape[1], target)
    return phi.float(), residual


def _explain_group(
    runner, x: np.ndarray, L: int, X_background: np.ndarray, rngs, config: ExplainConfig, f0: np.ndarray, f1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Attributions [m, T - L, F] on the real steps of sequences x [m, T, F] that all have L padded steps,
    and each sequence's sampling residual [m] (see :func:`_estimate`).
    """
    xt = torch.from_numpy(np.ascontiguousarray(x))
    base = torch.from_numpy(np.ascontiguousarray(X_background[:, L:]))  # [K, S, F]: baselines on the real steps
    delta = xt[:, None, L:] - base[None]  # [m, K, S, F]
    with torch.inference_mode():
        state = runner.prefix_state(xt[:, :L])
    out, residual = _estimate(runner, state, base, delta, f0, f1, config.alphas_per_background, config.path_grid, rngs, config)
    return out.numpy(), residual


def _expected_gradients(
    runner, x: np.ndarray, padded: np.ndarray, X_background: np.ndarray, rngs: list[np.random.Generator], config: ExplainConfig,
    f0: np.ndarray, f1: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell attributions [n, T, F] for sequences x [n, T, F], grouped by padding length, and
    each sequence's sampling residual [n] (0 for a sequence with no observed step).

    Sequences with the same padding share the suffix length, so each group runs over the real
    steps only (forward passes of at most max_rows_per_pass rows, gradient passes of about
    gradient_rows_per_pass). ``f0`` [n, K] and ``f1`` [n] are the outputs at the baselines and
    at the sequences (the ends of every path).
    """
    n, T, F = x.shape
    out = np.zeros((n, T, F), dtype=np.float32)
    residual = np.zeros(n)
    lengths = padded.sum(axis=1)
    groups = [np.flatnonzero(lengths == L) for L in np.unique(lengths) if L < T]  # L == T: all padding, zero

    def explain_group(members: np.ndarray) -> None:
        L = int(lengths[members[0]])
        out[members, L:], residual[members] = _explain_group(
            runner, x[members], L, X_background, [rngs[i] for i in members], config, f0[members], f1[members]
        )

    # Length groups run in parallel, one torch thread each: the passes are small, so intra-op
    # threads would mostly wait on each other (and spin when another process holds a core).
    # Only for the recurrent shortcut, whose work is in torch's fused kernels (which release the
    # GIL); a model of unknown structure (e.g. Keras's own per-step LSTM) keeps intra-op threads.
    workers = min(len(groups), torch.get_num_threads()) if isinstance(runner, _RecurrentPrefix) else 1
    if workers <= 1:
        for members in groups:
            explain_group(members)
        return out, residual
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            # Largest work first (sequences x real steps), so the last group to finish is a small one.
            list(pool.map(explain_group, sorted(groups, key=lambda g: -len(g) * (T - int(lengths[g[0]])))))
    finally:
        torch.set_num_threads(threads)
    return out, residual


def _sample_rngs(seed: int, index: np.ndarray) -> list[np.random.Generator]:
    """One generator per sequence keyed by its position, so results do not depend on batching."""
    return [np.random.default_rng([seed, int(i)]) for i in index]


def _check_shapes(X: np.ndarray, X_background: np.ndarray) -> None:
    if X.ndim != 3 or X_background.ndim != 3 or X.shape[1:] != X_background.shape[1:]:
        raise WorkbenchError(f"X {X.shape} and X_background {X_background.shape} must both be [N, T, F] with the same T and F")
    if len(X_background) == 0:
        raise WorkbenchError("X_background is empty; select_background draws it from the train split")


def iter_explanations(
    model,
    X: np.ndarray,
    X_background: np.ndarray,
    config: ExplainConfig | None = None,
    observed: np.ndarray | None = None,
    batch_size: int | None = None,
) -> Iterator[Explanation]:
    """Stream explanations of X in batches of ``batch_size`` sequences (default config.batch_size).

    Only one batch's intermediates (baselines, path points, gradients) are alive at a time, so
    any N can be explained; a tqdm bar counts sequences. Each yielded batch has ``index``
    giving its rows' positions in X.
    """
    config = config or ExplainConfig()
    batch_size = batch_size or config.batch_size
    X = np.asarray(X, dtype=np.float32)
    X_background = np.asarray(X_background, dtype=np.float32)
    _check_shapes(X, X_background)
    padded_all = padded_steps(X, observed)
    fn = output_function(model, config.output_space)
    with frozen_weights(model):
        runner = prefix_runner(model, fn, config.output_space, X_background[: min(8, len(X_background))])
        baseline_outputs = _BaselineOutputs(fn, X_background, config.max_rows_per_pass)
        with tqdm(total=len(X), desc="SHAP", unit="seq", disable=not config.progress) as bar:
            for start in range(0, len(X), batch_size):
                index = np.arange(start, min(len(X), start + batch_size))
                x, padded = X[index], padded_all[index]
                f0, f1 = baseline_outputs(x, padded), evaluate(fn, x, config.max_rows_per_pass)
                rngs = _sample_rngs(config.seed, index)
                shap_values, residual = _expected_gradients(runner, x, padded, X_background, rngs, config, f0, f1)
                yield Explanation(
                    shap=shap_values,
                    step_totals=shap_values.sum(axis=2),
                    feature_totals=shap_values.sum(axis=1),
                    output=f1,
                    base_value=f0.mean(axis=1),
                    index=index,
                    output_space=config.output_space,
                    sampling_residual=residual,
                )
                bar.update(len(index))


def explain(
    model,
    X: np.ndarray,
    X_background: np.ndarray,
    config: ExplainConfig | None = None,
    observed: np.ndarray | None = None,
) -> Explanation:
    """SHAP values of ``model`` on X [N, T, F] against X_background [K, T, F], all levels at once.

    ``observed`` [N, T] marks real steps (padding is what precedes the first one); without it,
    the leading all-zero rows are padding. See the module docstring for the method.
    """
    return Explanation.concat(list(iter_explanations(model, X, X_background, config, observed)))


# --------------------------------------------------------------------------------------
# Background selection
# --------------------------------------------------------------------------------------


def select_background_indices(
    X_train: np.ndarray, observed_train: np.ndarray | None, n: int, seed: int = 0, method: str = "kmeans"
) -> np.ndarray:
    """Indices of n train sequences to integrate from (sequences with no observed step are skipped).

    ``kmeans`` picks the real sequence nearest each of n k-means centroids (on the flattened
    sequences, fitted on at most 5,000 of them): real sequences keep the padding structure a
    blurred centroid would lose, and they spread over the data, so a small background is
    representative. ``random`` draws uniformly without replacement.
    """
    X_train = np.asarray(X_train, dtype=np.float32)
    candidates = np.flatnonzero(~padded_steps(X_train, observed_train).all(axis=1))
    if len(candidates) == 0:
        raise WorkbenchError("no train sequence has an observed step to use as background")
    n = min(n, len(candidates))
    rng = np.random.default_rng(seed)
    if method == "random" or n == len(candidates):
        return np.sort(rng.choice(candidates, size=n, replace=False))
    if method != "kmeans":
        raise WorkbenchError(f"background_selection must be 'random' or 'kmeans', not {method!r}")
    from sklearn.cluster import KMeans

    fit_rows = candidates if len(candidates) <= 5000 else rng.choice(candidates, size=5000, replace=False)
    flat = X_train[fit_rows].reshape(len(fit_rows), -1)
    centroids = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(flat).cluster_centers_
    chosen: list[int] = []
    distances = ((flat[:, None, :] - centroids[None]) ** 2).sum(axis=2) if len(flat) * n * flat.shape[1] < 2e8 else None
    for c in range(n):
        d = distances[:, c].copy() if distances is not None else ((flat - centroids[c]) ** 2).sum(axis=1)
        d[[fit_rows.tolist().index(i) for i in chosen]] = np.inf  # one centroid, one distinct sequence
        chosen.append(int(fit_rows[int(np.argmin(d))]))
    return np.sort(np.array(chosen))


def select_background(
    X_train: np.ndarray, observed_train: np.ndarray | None = None, n: int = 32, seed: int = 0, method: str = "kmeans"
) -> np.ndarray:
    """Background sequences [n, T, F] from the train split; see :func:`select_background_indices`."""
    return np.asarray(X_train, dtype=np.float32)[select_background_indices(X_train, observed_train, n, seed, method)]


# --------------------------------------------------------------------------------------
# 2. Exact reference: time steps as players
# --------------------------------------------------------------------------------------


class StepGame:
    """Value function of the step game for one sequence: v(S) = mean_k f(x on S, background k elsewhere).

    Players are the sequence's non-padded steps; padded steps stay at the sequence's own pad
    values. The empty and full coalitions are computed once and reused, so every estimator
    telescopes to exactly ``v(all) - v(empty)`` (float32 batch effects cannot break additivity).
    """

    def __init__(self, fn, x: np.ndarray, padded: np.ndarray, X_background: np.ndarray, rows_per_pass: int = 4096):
        self.fn, self.x, self.rows_per_pass = fn, x, rows_per_pass
        self.players = np.flatnonzero(~padded)
        self.baselines = sample_baselines(x[None], padded[None], X_background)[0]  # [K, T, F]
        empty, full = np.zeros(len(self.players)), np.ones(len(self.players))
        self.v_empty = float(self._values(empty[None])[0])
        self.v_full = float(self._values(full[None])[0])

    def _values(self, masks: np.ndarray) -> np.ndarray:
        K, T, F = self.baselines.shape
        on = np.zeros((len(masks), T), dtype=bool)
        on[:, self.players] = masks > 0.5
        rows = np.where(on[:, None, :, None], self.x[None, None], self.baselines[None])  # [M, K, T, F]
        return evaluate(self.fn, rows.reshape(-1, T, F), self.rows_per_pass).reshape(len(masks), K).mean(axis=1)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """v for each row of a binary matrix [M, players]; rows are evaluated in chunks bounded by rows_per_pass."""
        masks = np.asarray(masks)
        out = np.empty(len(masks))
        n_on = masks.sum(axis=1)
        out[n_on == 0] = self.v_empty
        out[n_on == masks.shape[1]] = self.v_full
        todo = np.flatnonzero((n_on > 0) & (n_on < masks.shape[1]))
        chunk = max(1, self.rows_per_pass // len(self.baselines))
        for s in range(0, len(todo), chunk):
            idx = todo[s : s + chunk]
            out[idx] = self._values(masks[idx])
        return out


def _shapley_of_game(game: StepGame, config: ExplainConfig, seed: int) -> np.ndarray:
    """Shapley values [players] of the step game by the configured shap estimator."""
    import shap

    P = len(game.players)
    if P == 1:
        return np.array([game.v_full - game.v_empty])
    ones, zeros = np.ones((1, P)), np.zeros((1, P))
    if config.reference_method == "permutation":
        explainer = shap.PermutationExplainer(game, shap.maskers.Independent(zeros, max_samples=1), seed=seed)
        result = explainer(ones, max_evals=config.reference_permutations * (2 * P + 1), silent=True)
        return np.asarray(result.values[0], dtype=np.float64)
    np.random.seed(seed)  # KernelExplainer samples coalitions from numpy's global generator
    explainer = shap.KernelExplainer(game, zeros)
    values = explainer.shap_values(ones, nsamples=config.reference_kernel_samples + 2 * P, l1_reg=False, silent=True)
    return np.asarray(values, dtype=np.float64).reshape(-1)[:P]


def exact_step_shap(
    model,
    X_few: np.ndarray,
    X_background: np.ndarray,
    observed: np.ndarray | None = None,
    config: ExplainConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step Shapley values (values [n, T], base [n], output [n]) with steps as players.

    A step outside the coalition takes the background row's value at that step, averaged over
    the background (TimeSHAP's event-level game); padded steps are not players and get 0.
    ``values.sum(1) == output - base`` to float64 rounding for either estimator (both are
    additive by construction and the game reuses its empty/full values). Costs about
    ``reference_permutations * (2 T + 1) * K`` forward passes per sequence: a few sequences.
    """
    config = config or ExplainConfig()
    X_few = np.asarray(X_few, dtype=np.float32)
    X_background = np.asarray(X_background, dtype=np.float32)
    _check_shapes(X_few, X_background)
    padded = padded_steps(X_few, observed)
    fn = output_function(model, config.output_space)
    n, T, _ = X_few.shape
    values, base, output = np.zeros((n, T)), np.empty(n), np.empty(n)
    with frozen_weights(model):
        for i in range(n):
            game = StepGame(fn, X_few[i], padded[i], X_background, config.max_rows_per_pass)
            base[i], output[i] = game.v_empty, game.v_full
            if len(game.players):
                values[i, game.players] = _shapley_of_game(game, config, seed=config.seed + i)
    return values, base, output


# --------------------------------------------------------------------------------------
# 3. Checks
# --------------------------------------------------------------------------------------


def additivity_errors(values_sum: np.ndarray, output: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-sample |sum(shap) - (output - base)| / max(|output - base|, ADDITIVITY_FLOOR)."""
    gap = np.asarray(output, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return np.abs(np.asarray(values_sum, dtype=np.float64) - gap) / np.maximum(np.abs(gap), ADDITIVITY_FLOOR)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 3) -> float:
    """Share of the k steps with the largest |a| that are also among the k largest |b|."""
    k = min(k, len(a))
    if k == 0:
        return float("nan")
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def reference_agreement(fast_steps: np.ndarray, ref_steps: np.ndarray, padded: np.ndarray) -> dict[str, float]:
    """Mean Pearson correlation and top-3 overlap of per-step totals, over each sequence's real steps.

    Rank correlation is not used: most steps sit near zero and their order is noise.
    Sequences with fewer than 3 real steps or constant totals have no correlation and are skipped.
    """
    pearsons, overlaps = [], []
    for f, r, p in zip(fast_steps, ref_steps, padded):
        f, r = f[~p], r[~p]
        if len(f) >= 3 and np.std(f) > 0 and np.std(r) > 0:
            pearsons.append(float(np.corrcoef(f, r)[0, 1]))
        if len(f):
            overlaps.append(top_k_overlap(f, r, 3))
    return {
        "reference_pearson_mean": float(np.mean(pearsons)) if pearsons else float("nan"),
        "reference_pearson_min": float(np.min(pearsons)) if pearsons else float("nan"),
        "reference_top3_overlap_mean": float(np.mean(overlaps)) if overlaps else float("nan"),
    }


def _output_after_removal(fn, x: np.ndarray, padded: np.ndarray, X_background: np.ndarray, removed: np.ndarray, rows_per_pass: int) -> np.ndarray:
    """Mean output over the background when the steps flagged in removed [M, T] are replaced by the background's."""
    baselines = sample_baselines(x[None], padded[None], X_background)[0]  # [K, T, F]
    rows = np.where(removed[:, None, :, None], baselines[None], x[None, None])
    K, T, F = baselines.shape
    return evaluate(fn, rows.reshape(-1, T, F), rows_per_pass).reshape(len(removed), K).mean(axis=1)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, NaN when either side is constant."""
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _centred(a: np.ndarray) -> np.ndarray:
    """Rows minus their means."""
    return a - a.mean(axis=1, keepdims=True)


def deletion_curve(
    model,
    X: np.ndarray,
    step_totals: np.ndarray,
    X_background: np.ndarray,
    config: ExplainConfig,
    observed: np.ndarray | None = None,
    output_space: OutputSpace | None = None,
) -> dict[str, np.ndarray]:
    """Deletion test: how much the output moves when the steps an explanation ranks first are removed.

    Removing a step replaces it by the background's value at that step (the game the
    attributions explain), averaged over the background. For each k in ``deletion_k``, the
    top-k steps by |step total| are removed, and ``deletion_random_draws`` sets of k random
    real steps. The change is ``output(x) - output(x without the steps)`` in ``output_space``
    (default ``config.output_space``: the space the step totals sum in), so the sum of the
    removed steps' attributions predicts it.

    Why |attribution| and |change|: a low-risk sequence's steps mostly *lowered* its risk, so
    ranking by signed total (the steps that raised it most) picks near-zero steps, and a
    signed fall mixes up "moved little" with "moved the other way"; the test would then
    depend on the share of low-risk samples rather than on the explanation.

    Returns, per k [len(deletion_k)]: ``k``; ``top`` and ``random``, the mean |change| for the
    top-k and the random sets; ``win_rate``, the share of sequences where the top-k set moves
    the output more than the random sets do on average; ``n``, the sequences counted (those
    with more than k real steps: with k or fewer, both sets are all the steps). And per
    sequence [N], ``agreement``: the Pearson correlation between predicted and actual change
    over all its removed sets, each centred on its k's mean (so it measures which sets of
    the same size matter more, and in which direction; NaN when either side is constant,
    e.g. a single real step).
    """
    rng = np.random.default_rng(config.seed)
    X = np.asarray(X, dtype=np.float32)
    padded = padded_steps(X, observed)
    fn = output_function(model, output_space or config.output_space)
    ks = np.array(sorted(set(config.deletion_k)))
    D = config.deletion_random_draws
    top, rand = np.full((len(X), len(ks)), np.nan), np.full((len(X), len(ks)), np.nan)
    agreement = np.full(len(X), np.nan)
    with frozen_weights(model):
        for i in range(len(X)):
            real = np.flatnonzero(~padded[i])
            if len(real) == 0:
                continue
            order = real[np.argsort(-np.abs(step_totals[i, real]), kind="stable")]
            removed = np.zeros((len(ks) * (1 + D) + 1, X.shape[1]), dtype=bool)  # last row: nothing removed
            for j, k in enumerate(ks):
                removed[j * (1 + D), order[:k]] = True
                for d in range(D):
                    removed[j * (1 + D) + 1 + d, rng.permutation(real)[:k]] = True
            out = _output_after_removal(fn, X[i], padded[i], X_background, removed, config.max_rows_per_pass)
            change = (out[-1] - out[:-1]).reshape(len(ks), 1 + D)
            predicted = (removed[:-1] * step_totals[i]).sum(axis=1).reshape(len(ks), 1 + D)
            # Centred within each k: larger sets move the output more whatever the explanation
            # says, so the raw correlation would credit even a uniform attribution.
            agreement[i] = _pearson(_centred(predicted).ravel(), _centred(change).ravel())
            counted = ks < len(real)
            top[i, counted] = np.abs(change[counted, 0])
            rand[i, counted] = np.abs(change[counted, 1:]).mean(axis=1)
    n = (~np.isnan(top)).sum(axis=0)
    wins = np.where(np.isnan(top), np.nan, top > rand)

    def mean_over_counted(a: np.ndarray) -> np.ndarray:
        return np.where(n > 0, np.nansum(a, axis=0) / np.maximum(n, 1), np.nan)

    return {
        "k": ks,
        "top": mean_over_counted(top),
        "random": mean_over_counted(rand),
        "win_rate": mean_over_counted(wins),
        "n": n,
        "agreement": agreement,
    }


def check_explanation(
    model,
    X: np.ndarray,
    expl: Explanation,
    X_background: np.ndarray,
    config: ExplainConfig | None = None,
    observed: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics that say whether an explanation can be trusted (flat dict, ready for mlflow.log_metrics).

    ``X`` is the full array the explanation's ``index`` points into. Additivity is measured
    on every explained sequence (``sampling_additivity_mean_rel_error`` /
    ``sampling_additivity_p95_rel_error``: the same measure on the estimate before the
    completeness regression, when the explanation recorded it); the exact reference on the
    first ``reference_samples`` of a seeded shuffle; the deletion test (:func:`deletion_curve`) on ``deletion_samples`` of
    another: ``deletion_change_top_k{k}`` / ``deletion_change_random_k{k}`` are the mean
    |change in output| when the top-k steps by |attribution| / k random steps are removed,
    ``deletion_change_top`` / ``deletion_change_random`` their means over k,
    ``deletion_win_rate`` the share of (sequence, k) pairs where the top-k set moves the
    output more, and ``deletion_agreement`` the mean per-sequence correlation of predicted
    (sum of removed SHAP) and actual change. :func:`check_verdicts` judges them.
    """
    config = config or ExplainConfig()
    X = np.asarray(X, dtype=np.float32)
    padded_all = padded_steps(X, observed)
    errors = additivity_errors(expl.shap.reshape(len(expl), -1).sum(axis=1), expl.output, expl.base_value)
    metrics = {"additivity_mean_rel_error": float(errors.mean()), "additivity_max_rel_error": float(errors.max())}
    if expl.sampling_residual is not None:
        # The uncorrected estimate's additivity error: the sampling error the completeness regression removed.
        sampling = np.abs(expl.sampling_residual) / np.maximum(np.abs(expl.output - expl.base_value), ADDITIVITY_FLOOR)
        metrics |= {
            "sampling_additivity_mean_rel_error": float(sampling.mean()),
            "sampling_additivity_p95_rel_error": float(np.quantile(sampling, 0.95)),
        }
    rng = np.random.default_rng(config.seed)
    if config.reference_samples:
        pick = rng.permutation(len(expl))[: config.reference_samples]
        rows = expl.index[pick]
        obs = None if observed is None else np.asarray(observed)[rows]
        ref, ref_base, ref_out = exact_step_shap(model, X[rows], X_background, obs, config)
        metrics |= reference_agreement(expl.step_totals[pick], ref, padded_all[rows])
        ref_err = additivity_errors(ref.sum(axis=1), ref_out, ref_base)
        metrics |= {"reference_additivity_max_rel_error": float(ref_err.max()), "reference_samples": float(len(rows))}
    if config.deletion_samples:
        pick = rng.permutation(len(expl))[: config.deletion_samples]
        rows = expl.index[pick]
        obs = None if observed is None else np.asarray(observed)[rows]
        curve = deletion_curve(model, X[rows], expl.step_totals[pick], X_background, config, obs, expl.output_space)
        for k, t, r in zip(curve["k"], curve["top"], curve["random"]):
            metrics[f"deletion_change_top_k{k}"], metrics[f"deletion_change_random_k{k}"] = float(t), float(r)
        n, counted = curve["n"], curve["n"] > 0
        metrics["deletion_change_top"] = float(curve["top"][counted].mean()) if counted.any() else float("nan")
        metrics["deletion_change_random"] = float(curve["random"][counted].mean()) if counted.any() else float("nan")
        metrics["deletion_win_rate"] = float((curve["win_rate"][counted] * n[counted]).sum() / n.sum()) if counted.any() else float("nan")
        agreement = curve["agreement"][~np.isnan(curve["agreement"])]
        metrics["deletion_agreement"] = float(agreement.mean()) if len(agreement) else float("nan")
        metrics["deletion_samples"] = float(len(rows))
    return metrics


# --------------------------------------------------------------------------------------
# Verdicts: each check against its threshold
# --------------------------------------------------------------------------------------

VERDICT_TAG = EXPLAIN_VERDICT_TAG  # declared once in workbench.record
CHECK_TAG_PREFIX = EXPLAIN_CHECK_TAG_PREFIX


@dataclasses.dataclass(frozen=True)
class _Check:
    key: str  # tag suffix
    name: str
    metric: str  # key in check_explanation's dict
    threshold_field: str  # ExplainConfig field
    higher_is_better: bool
    meaning: str


_CHECKS = (
    _Check(
        "additivity", "additivity (mean relative error)", "additivity_mean_rel_error", "max_additivity_error", False,
        "SHAP values sum to output - base value (exactly, up to rounding, with the completeness regression; with completeness='none' "
        "a large error means too few gradient draws: raise alphas_per_background).",
    ),
    _Check(
        "sampling_additivity", "additivity before the completeness regression (mean relative error)",
        "sampling_additivity_mean_rel_error", "max_additivity_error", False,
        "How far the gradient draws alone were from summing to output - base value (the error the regression then "
        "spread over the cells): a large value means too few draws (raise alphas_per_background or path_grid).",
    ),
    _Check(
        "reference_pearson", "reference agreement (mean Pearson per sequence)", "reference_pearson_mean", "min_reference_pearson", True,
        "Per-step totals follow the exact per-step Shapley reference on a sample of sequences.",
    ),
    _Check(
        "reference_top3", "reference agreement (top-3 step overlap)", "reference_top3_overlap_mean", "min_reference_top3_overlap", True,
        "The 3 steps the explanation ranks first are the exact reference's 3 most important steps.",
    ),
    _Check(
        "deletion_ranking", "deletion: top-k vs random steps (win rate)", "deletion_win_rate", "min_deletion_win_rate", True,
        "Removing the steps ranked first by |SHAP| moves the output more than removing as many random steps (0.5 or less: no better than chance).",
    ),
    _Check(
        "deletion_agreement", "deletion: predicted vs actual change (mean Pearson)", "deletion_agreement", "min_deletion_agreement", True,
        "The removed steps' SHAP sum predicts, with its sign, how much the output changes when they are removed.",
    ),
)


def check_verdicts(checks: dict[str, float], config: ExplainConfig | None = None) -> pl.DataFrame:
    """One row per check found in ``checks`` (from :func:`check_explanation`): PASS or WARN against its threshold.

    Columns: ``key`` (tag suffix), ``check`` (human name), ``value``, ``threshold`` (as text,
    e.g. ``"<= 0.05"``), ``verdict`` and ``meaning``. Checks that were not run (no reference,
    no deletion samples) have no row; a value that could not be measured (NaN) is a WARN.
    Thresholds are ExplainConfig fields (``max_additivity_error``, ``min_reference_pearson``,
    ``min_reference_top3_overlap``, ``min_deletion_win_rate``, ``min_deletion_agreement``).
    """
    config = config or ExplainConfig()
    rows = []
    for c in _CHECKS:
        if c.metric not in checks:
            continue
        value, limit = float(checks[c.metric]), float(getattr(config, c.threshold_field))
        ok = (value >= limit) if c.higher_is_better else (value <= limit)  # False for NaN
        rows.append(
            {
                "key": c.key,
                "check": c.name,
                "value": value,
                "threshold": f"{'>=' if c.higher_is_better else '<='} {limit:g}",
                "verdict": "PASS" if ok else "WARN",
                "meaning": c.meaning,
            }
        )
    schema = {"key": pl.String, "check": pl.String, "value": pl.Float64, "threshold": pl.String, "verdict": pl.String, "meaning": pl.String}
    return pl.DataFrame(rows, schema=schema)


def verdict_tags(verdicts: pl.DataFrame) -> dict[str, str]:
    """MLflow tags from :func:`check_verdicts`: ``workbench.explain.check.<key>`` per check and the overall verdict.

    ``workbench.explain.verdict`` is PASS when every check passed, else WARN (also WARN when
    there is no check at all: nothing was verified).
    """
    tags = {f"{CHECK_TAG_PREFIX}{key}": verdict for key, verdict in zip(verdicts["key"], verdicts["verdict"])}
    passed = verdicts.height > 0 and all(v == "PASS" for v in verdicts["verdict"])
    return tags | {VERDICT_TAG: "PASS" if passed else "WARN"}


# --------------------------------------------------------------------------------------
# Long format for the parquet artifact
# --------------------------------------------------------------------------------------


def explanation_frame(
    expl: Explanation,
    subject_id: np.ndarray,
    prediction_time: np.ndarray,
    step_end_time: np.ndarray,
    feature_names: Sequence[str],
    raw_X: np.ndarray,
    observed: np.ndarray,
) -> pl.DataFrame:
    """One row per (sequence, real step, feature): the Explanations contract's long format.

    Per-sequence arrays (subject_id, prediction_time, step_end_time, raw_X, observed) are
    indexed like the X that was explained (``expl.index`` selects the rows); ``raw_X`` holds
    unnormalized values (``spec.denormalize(X)``, which is not zero on padding, hence
    ``observed`` decides what is padding). Padded steps are left out.
    """
    idx = expl.index
    raw = np.asarray(raw_X)[idx]
    keep_steps = ~padded_steps(raw, np.asarray(observed)[idx])
    n, T, F = expl.shap.shape
    seq, step = np.nonzero(keep_steps)
    seq_rep, step_rep = np.repeat(seq, F), np.repeat(step, F)
    feat_rep = np.tile(np.arange(F), len(seq))
    names = np.asarray(list(feature_names), dtype=object)
    return pl.DataFrame(
        {
            "subject_id": np.asarray(subject_id)[idx][seq_rep],
            "prediction_time": np.asarray(prediction_time)[idx][seq_rep],
            "step": step_rep.astype(np.int32),
            "step_end_time": np.asarray(step_end_time)[idx][seq_rep, step_rep],
            "feature": names[feat_rep].tolist(),
            "value": raw[seq_rep, step_rep, feat_rep].astype(np.float32),
            "shap": expl.shap[seq_rep, step_rep, feat_rep],
            "step_total": expl.step_totals[seq_rep, step_rep],
            "feature_total": expl.feature_totals[seq_rep, feat_rep],
            "output": expl.output[seq_rep],
            "base_value": expl.base_value[seq_rep],
        }
    )
