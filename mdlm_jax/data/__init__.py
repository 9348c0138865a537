"""Data: TFDS builders (python_stdlib, text_files) and the Grain pipeline."""
