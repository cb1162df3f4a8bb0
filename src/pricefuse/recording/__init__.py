"""MLflow glue: stage runs and what they log, dataset digests, the model registry and promotion
gate, DVC experiments, run comparison, the team server. With `serving`, the only package that
imports mlflow."""
