"""TFDS builders that ship with the package (importing registers them with TFDS)."""
from paraformer_jax.datasets import sklearn_digits  # noqa: F401
