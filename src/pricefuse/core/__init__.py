"""Foundations every layer may import: parameters, file layout, errors, metrics, model references,
what a stage records. Imports nothing else of pricefuse."""
