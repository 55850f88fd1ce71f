"""Healthcare analytics workbench: MEDS events -> labels -> tensors -> LSTM -> SHAP -> MLflow."""

import os

# Keras reads its backend once, at first import. The workbench's models are torch modules
# (fused torch RNN kernels, shap's GradientExplainer), so torch is the default backend.
os.environ.setdefault("KERAS_BACKEND", "torch")

__version__ = "0.1.0"
