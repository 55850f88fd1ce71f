"""The file MLflow loads every workbench model from ("models from code": no pickled Python object).

MLflow runs this file when a logged model is loaded; the model's own settings (its kind and
options) come from the logged ``model_config``, its fitted parts from the logged artifacts.
See :mod:`workbench.serving`.
"""

import mlflow

from workbench.serving import RiskModel

mlflow.models.set_model(RiskModel())
