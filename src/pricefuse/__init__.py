"""pricefuse: multimodal product price prediction, reproducible with DVC and tracked with MLflow."""

__version__ = "0.1.0"
