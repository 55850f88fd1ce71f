"""Healthcare analytics workbench: MEDS events -> labels -> tensors -> LSTM -> SHAP -> MLflow."""

__version__ = "0.1.0"
