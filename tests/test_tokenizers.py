"""Byte and SentencePiece tokenizers share the special ids and count bytes per token."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mdlm_jax import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bytes_tokenizer_roundtrip_and_specials():
  tok = tokenizers.get_tokenizer("bytes")
  text = "héllo\n\tworld ✓"
  ids = tok.encode(text)
  assert (ids >= tokenizers.NUM_SPECIAL).all() and len(ids) == len(text.encode())
  assert tok.decode(np.concatenate([[tokenizers.BOS], ids, [tokenizers.EOS]])) == text
  assert tok.token_bytes[ids].sum() == len(text.encode())
  assert tok.token_bytes[:tokenizers.NUM_SPECIAL].sum() == 0
  assert tok.decode_with_specials([tokenizers.MASK, *tok.encode("ab")]) == "_ab"


@pytest.mark.slow
def test_sentencepiece_tokenizer_trained_by_the_tool(tmp_path, corpus, data_dir):
  out = str(tmp_path / "tok.model")
  p = subprocess.run([sys.executable, "tools/train_tokenizer.py", f"--output={out}",
                      "--vocab_size=300", "--config.data.name=text_files",
                      f"--config.data.files={corpus}", f"--config.data.data_dir={data_dir}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900,
                     env={**os.environ, "XLA_FLAGS": ""})
  assert p.returncode == 0, p.stderr[-2000:]
  tok = tokenizers.get_tokenizer(out)
  assert tok.vocab_size == 300 + tokenizers.NUM_SPECIAL
  text = "alpha beta gamma café"
  ids = tok.encode(text)
  assert (ids >= tokenizers.NUM_SPECIAL).all()
  assert len(ids) < len(text.encode()), "pieces should merge bytes"
  assert tok.decode(ids) == text
  assert tok.token_bytes[ids].sum() == len(text.encode())


def test_bad_tokenizer_path_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer"):
    tokenizers.get_tokenizer(str(tmp_path / "missing.model"))
