"""The served model: the pyfunc `price-ensemble`, its request parsing and its models-from-code
entry point."""
