"""The `fusion` member: a neural head over embeddings and tabular features."""
