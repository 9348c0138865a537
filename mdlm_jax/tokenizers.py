"""Tokenizers. Every tokenizer reserves the same special ids so all objectives share them.

ids 0..NUM_SPECIAL-1 are specials; a base vocabulary (256 bytes, or a SentencePiece model's
pieces) follows at offset NUM_SPECIAL.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>", "<blank>", "<fim_prefix>", "<fim_middle>",
            "<fim_suffix>")
PAD, BOS, EOS, MASK, BLANK, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = range(len(SPECIALS))
NUM_SPECIAL = len(SPECIALS)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Maps text to ids and back. `token_bytes[i]` is the UTF-8 byte count of token i (0 for
  specials), used to turn nats per token into bits per byte."""
  name: str
  vocab_size: int
  token_bytes: np.ndarray
  _sp: object = None

  def encode(self, text: str | bytes) -> np.ndarray:
    if self._sp is None:
      data = text.encode("utf-8", "replace") if isinstance(text, str) else text
      return np.frombuffer(data, np.uint8).astype(np.int32) + NUM_SPECIAL
    if isinstance(text, bytes):
      text = text.decode("utf-8", "replace")
    return np.asarray(self._sp.encode(text), np.int32) + NUM_SPECIAL

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) >= NUM_SPECIAL]
    if self._sp is None:
      return bytes(i - NUM_SPECIAL for i in ids).decode("utf-8", "replace")
    return self._sp.decode([i - NUM_SPECIAL for i in ids])

  def decode_until_eos(self, ids) -> str:
    """Decodes the ids before the first EOS (all of them when there is none)."""
    ids = np.asarray(ids).reshape(-1)
    end = np.flatnonzero(ids == EOS)
    return self.decode(ids[:end[0]] if len(end) else ids)

  def decode_with_specials(self, ids) -> str:
    """Decodes and shows special ids as their names (for step-by-step displays)."""
    out, run = [], []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i >= NUM_SPECIAL:
        run.append(i)
        continue
      if run:
        out.append(self.decode(run))
        run = []
      out.append("_" if i == MASK else SPECIALS[i])
    if run:
      out.append(self.decode(run))
    return "".join(out)


def get_tokenizer(spec: str) -> Tokenizer:
  """`bytes` or the path of a SentencePiece `.model` file."""
  if spec == "bytes":
    tb = np.concatenate([np.zeros(NUM_SPECIAL, np.int32), np.ones(256, np.int32)])
    return Tokenizer("bytes", NUM_SPECIAL + 256, tb)
  path = os.path.expanduser(spec)
  if not path.endswith(".model") or not os.path.isfile(path):
    raise ValueError(f"data.tokenizer={spec!r}: expected 'bytes' or the path of an existing "
                     "SentencePiece .model file (train one with tools/train_tokenizer.py).")
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=path)
  n = sp.get_piece_size()
  tb = np.zeros(NUM_SPECIAL + n, np.int32)
  for i in range(n):
    if sp.is_byte(i):
      tb[NUM_SPECIAL + i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      tb[NUM_SPECIAL + i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
  return Tokenizer(os.path.basename(path), NUM_SPECIAL + n, tb, sp)
