"""Healthcare analytics workbench: MEDS events -> labels -> tensors -> LSTM -> SHAP -> MLflow."""

import os

# Keras reads its backend once, at first import. The workbench's models are torch modules
# (fused torch RNN kernels, shap's GradientExplainer), so torch is the default backend.
# Every workbench module runs this file first; a test or script that imports keras itself
# imports workbench before it.
KERAS_BACKEND = "torch"
os.environ.setdefault("KERAS_BACKEND", KERAS_BACKEND)

__version__ = "0.1.0"
