"""Healthcare analytics workbench: MEDS events -> labels -> tensors -> LSTM -> SHAP -> MLflow."""

import os

# Keras reads its backend once, at first import. The workbench's models are torch modules
# (fused torch RNN kernels, shap's GradientExplainer), so torch is the default backend.
# Every workbench module runs this file first; a test or script that imports keras itself
# imports workbench before it.
KERAS_BACKEND = "torch"
os.environ.setdefault("KERAS_BACKEND", KERAS_BACKEND)

__version__ = "0.1.0"

# Nothing leaves the machine: MLflow 3 sends usage telemetry to mlflow-telemetry.io unless told
# not to, and a Prefect server reports analytics. Both are off for this process and everything
# it starts (kernels, `workbench ui` / `server`, model serving), unless the user sets them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
