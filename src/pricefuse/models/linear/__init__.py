"""The `linear` member: TF-IDF n-grams and ridge regression."""
