"""The typed settings of the model, training, evaluation and explanation stages: one place for
each default, importable without torch, keras or scikit-learn (notebooks and ``load_pipeline``
validate parameters against them before any heavy import). Each stage module re-exports its own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RecurrentKind = Literal["lstm", "gru", "rnn"]
SEQUENCE_KINDS = ("lstm", "gru", "rnn")
TABULAR_KINDS = ("logistic", "gbt")  # references on the whole history's tabular features
MODEL_KINDS = SEQUENCE_KINDS + TABULAR_KINDS + ("mayo",)
ModelKind = Literal["lstm", "gru", "rnn", "logistic", "gbt", "mayo"]
SURVIVAL_KINDS = SEQUENCE_KINDS + ("cox", "mayo")  # survival tasks: hazard networks, landmark Cox, Mayo
OutputSpace = Literal["probability", "logit"]



class ModelConfig(BaseModel):
    """Architecture and optimizer of a sequence risk model."""

    model_config = ConfigDict(extra="forbid")

    kind: RecurrentKind = Field("lstm", description="Recurrent layer: lstm, gru or rnn (SimpleRNN).")
    units: int = Field(64, ge=1, le=2048, description="Hidden units per recurrent layer (per direction).")
    layers: int = Field(1, ge=1, le=8, description="Number of stacked recurrent layers.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of each recurrent layer's input features dropped in training (same mask at every step)."
    )
    recurrent_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the recurrent state; > 0 switches to Keras's slower per-step layers."
    )
    bidirectional: bool = Field(False, description="Also read the sequence backwards and concatenate both directions.")
    head_units: int = Field(0, ge=0, le=4096, description="Units of an optional ReLU dense layer before the risk output (0 = none).")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate.")



class TrainConfig(BaseModel):
    """How a sequence model is trained."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1, le=10_000, description="Maximum number of passes over the train split.")
    batch_size: int = Field(256, ge=1, le=1_000_000, description="Sequences per gradient step.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds initial weights, shuffling and dropout; same seed, same result on CPU.")
    early_stopping_metric: Literal["auroc", "auprc"] = Field(
        "auroc", description="Tuning-split metric that picks the best epoch and stops training."
    )
    patience: int = Field(5, ge=1, le=10_000, description="Epochs without improvement of the metric before stopping.")
    class_weight: Literal["balanced"] | None = Field(
        None,
        description="null weighs samples equally (the loss then targets probabilities); 'balanced' weighs each class "
        "inversely to its frequency in the train split, which inflates every risk (recalibration undoes part of it).",
    )
    progress: bool = Field(True, description="Show a progress bar over epochs with the loss and tuning metrics.")



class EvalConfig(BaseModel):
    """How a model is evaluated on the held-out split."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | Literal["youden", "prevalence"] = Field(
        default="youden",
        description=(
            "Risk at or above which a sample is flagged positive (sensitivity, specificity, PPV, NPV). "
            "A number in [0, 1], or a rule chosen on the tuning split and then held fixed on held-out: "
            "'youden' (maximises sensitivity + specificity - 1) or 'prevalence' (flags risks at or above "
            "the tuning outcome rate). evaluate() called on its own applies a rule to the data it is given."
        ),
    )
    recalibration: Literal["platt", "isotonic", "none"] = Field(
        default="platt",
        description=(
            "Map from a fitted model's risk to a probability, fitted on the tuning split and saved inside the "
            "model: platt (logistic on the logit; folded into a network's last layer, so SHAP explains the "
            "calibrated risk), isotonic (a step function applied after the model), or none. The published Mayo "
            "score is never recalibrated."
        ),
    )
    n_bootstrap: int = Field(
        default=1000,
        ge=0,
        le=100_000,
        description="Bootstrap resamples for the confidence intervals; 0 disables CIs.",
    )
    ci: float = Field(
        default=0.95,
        gt=0.5,
        lt=1.0,
        description="Coverage of the percentile bootstrap confidence interval.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the bootstrap random generator.")
    n_calibration_bins: int = Field(
        default=10,
        ge=2,
        le=100,
        description="Bins of predicted risk for the calibration curve and the ECE.",
    )
    calibration_strategy: Literal["uniform", "quantile"] = Field(
        default="uniform",
        description=(
            "'uniform': equal-width bins on [0, 1]; 'quantile': bins holding equal numbers "
            "of samples (as sklearn.calibration.calibration_curve)."
        ),
    )
    age_bands: list[float] = Field(
        default_factory=lambda: [0.0, 50.0, 65.0, 200.0],
        description=(
            "Age band edges in years, strictly increasing; a numeric 'age' entry in "
            "evaluate(groups=...) is reported as the subgroup 'age_band' with labels "
            "such as '<50', '50-65', '>=65'."
        ),
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_is_a_probability(cls, value):
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {value}")
        return value

    @field_validator("age_bands")
    @classmethod
    def _age_bands_increase(cls, value: list[float]) -> list[float]:
        if len(value) < 3 or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(
                "age_bands must be at least 3 strictly increasing edges, e.g. [0, 50, 65, 200]"
            )
        return value



class ExplainConfig(BaseModel):
    """How explanations are computed and checked (one field per knob, YAML-loadable)."""

    model_config = ConfigDict(extra="forbid")

    n_background: int = Field(
        16, ge=1, le=4096, description="Background sequences drawn from the train split; each explained sequence is integrated from every one."
    )
    background_selection: Literal["random", "kmeans"] = Field(
        "kmeans",
        description="random: uniform draw of train sequences; kmeans: the train sequence nearest each k-means centroid (real sequences, spread over the data).",
    )
    alphas_per_background: int = Field(
        8,
        ge=1,
        le=256,
        description="Interpolation points per background row; gradient evaluations per sequence = n_background * alphas_per_background.",
    )
    alpha_scheme: Literal["adaptive", "stratified", "gauss_legendre", "uniform"] = Field(
        "adaptive",
        description=(
            "adaptive: alphas drawn where a forward-only grid along each path shows the output changing (importance sampling); "
            "stratified: shuffled midpoint grid over all evaluations (Latin hypercube); "
            "gauss_legendre: the same Gauss-Legendre nodes on every row; uniform: i.i.d. like shap."
        ),
    )
    path_grid: int = Field(
        8, ge=1, le=256, description="adaptive scheme: forward-only evaluations per path (grid cells) that locate where the output changes."
    )
    adaptive_pooled: bool = Field(
        True,
        description="adaptive scheme: spread the n_background * alphas_per_background draws over all paths by output change (True) or give every path the same number (False).",
    )
    uniform_share: float = Field(
        0.5, gt=0.0, le=1.0, description="adaptive scheme: share of the sampling density spread uniformly over the path (keeps every alpha reachable, so the estimate stays unbiased)."
    )
    output_space: OutputSpace = Field("probability", description="Space the attributions sum in: probability (risk) or logit (log-odds).")
    batch_size: int = Field(256, ge=1, le=1_000_000, description="Sequences per streamed batch (what iter_explanations yields at a time).")
    max_rows_per_pass: int = Field(
        4096, ge=1, le=1_000_000, description="Model rows per forward-only pass; bounds the memory of intermediates."
    )
    gradient_rows_per_pass: int = Field(
        128,
        ge=1,
        le=1_000_000,
        description="Model rows per gradient (forward + backward) pass, at least one sequence's draws; small passes stay in CPU cache.",
    )
    completeness: Literal["regression", "none"] = Field(
        "regression",
        description=(
            "regression: each cell's contribution over the draws is regressed on the draw's total, whose true value (output - base) is known, "
            "and corrected by it (a control variate: lower error, and attributions that sum to output - base exactly); none: the plain estimate."
        ),
    )
    seed: int = Field(0, description="Seeds background selection, alpha grids, reference permutations and deletion draws.")
    progress: bool = Field(True, description="Show a tqdm progress bar while explaining.")
    reference_samples: int = Field(20, ge=0, le=10_000, description="Sequences that get the exact per-step reference in check_explanation (0 skips it).")
    reference_method: Literal["permutation", "kernel"] = Field(
        "permutation",
        description="Exact reference estimator: permutation (shap.PermutationExplainer, antithetic) or kernel (shap.KernelExplainer, TimeSHAP's method).",
    )
    reference_permutations: int = Field(
        10, ge=1, le=10_000, description="Antithetic permutation pairs per sequence for the permutation reference."
    )
    reference_kernel_samples: int = Field(
        2048, ge=16, le=1_000_000, description="Coalitions per sequence for the kernel reference (shap adds 2 * players)."
    )
    deletion_k: list[int] = Field(
        [1, 2, 3, 5], description="Numbers of steps removed in the deletion test (top-k by |attribution| vs k random real steps)."
    )
    deletion_samples: int = Field(200, ge=0, le=1_000_000, description="Sequences used for the deletion test (0 skips it).")
    deletion_random_draws: int = Field(4, ge=1, le=1000, description="Random step sets per sequence and k in the deletion test.")
    # Verdict thresholds (check_verdicts): one place for each default.
    max_additivity_error: float = Field(
        0.05, ge=0.0, description="PASS when the mean relative additivity error |sum(shap) - (output - base)| / |output - base| is at most this."
    )
    min_reference_pearson: float = Field(
        0.9, ge=-1.0, le=1.0, description="PASS when the mean Pearson correlation of per-step totals with the exact reference is at least this."
    )
    min_reference_top3_overlap: float = Field(
        0.8, ge=0.0, le=1.0, description="PASS when the mean share of the reference's top-3 steps (by |value|) that the fast path also ranks top-3 is at least this."
    )
    min_deletion_win_rate: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="PASS when removing the top-k steps by |attribution| moves the output more than removing k random real steps for at least this share of (sequence, k) pairs (about 0.5 or less for a ranking no better than chance).",
    )
    min_deletion_agreement: float = Field(
        0.6,
        ge=-1.0,
        le=1.0,
        description="PASS when the mean per-sequence Pearson correlation between the predicted change (sum of the removed steps' SHAP) and the actual change in output, over the removed step sets, is at least this.",
    )
