"""The contract between stages: loading and checking what stages read, prediction files, the member
registry (names only) and the submission. Imports core and data."""
