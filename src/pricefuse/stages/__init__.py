"""Pipeline stages: thin glue that reads params, calls the library, writes outputs, logs a run."""
