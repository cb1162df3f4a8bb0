"""The neighbour features and the `knn` member."""
