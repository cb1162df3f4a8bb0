"""Models-from-code entry point of the served model.

MLflow executes this file when logging and when loading `price-ensemble`, so the model is
rebuilt from source (shipped with it as code) instead of being unpickled: no arbitrary code in a
pickle, and no pickle that breaks when a class moves.
"""

from mlflow.models import set_model

from pricefuse.serving.model import PriceEnsembleModel

set_model(PriceEnsembleModel())
