"""Data: TFDS builders (python_stdlib, text_files, sft_pairs, star_graph) and the Grain
pipeline."""
from mdlm_jax.data import builders, star_graph  # star_graph registers its source

__all__ = ["builders", "star_graph"]
