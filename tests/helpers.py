"""Test helpers without side effects (importable by subprocess workers)."""
import json
import os
import random

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def return class import for while if else")


def write_corpus(root, docs: int = 300, seed: int = 0) -> str:
  """A jsonl corpus plus text files (one with invalid UTF-8, one empty); returns a glob."""
  rng = random.Random(seed)
  words = WORDS.split()
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "docs.jsonl"), "w") as f:
    for _ in range(docs):
      n = rng.randint(5, 60)
      f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    f.write("\n")  # blank lines are skipped
  with open(os.path.join(root, "latin1.txt"), "wb") as f:
    f.write(b"caf\xe9 na\xefve \xff\xfe bytes that are not UTF-8\n")
  open(os.path.join(root, "empty.txt"), "w").close()
  return os.path.join(root, "*")


def positions_of(seg):
  """Positions restarting at 0 wherever the segment id changes (numpy (B, T) int32)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  seg = np.asarray(seg)
  pos = np.zeros_like(seg)
  for j in range(1, seg.shape[1]):
    pos[:, j] = np.where(seg[:, j] == seg[:, j - 1], pos[:, j - 1] + 1, 0)
  return pos


def packed_batch(docs, t):
  """Rows of documents [BOS] words [EOS] packed in order (a list of lists of word ids per row),
  padded: a batch dict of jnp (B, T) int32 arrays."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  x = np.full((len(docs), t), tokenizers.PAD, np.int32)
  seg = np.zeros((len(docs), t), np.int32)
  for r, row in enumerate(docs):
    i = 0
    for s, words in enumerate(row, start=1):
      doc = [tokenizers.BOS, *words, tokenizers.EOS]
      x[r, i:i + len(doc)], seg[r, i:i + len(doc)] = doc, s
      i += len(doc)
  return {"inputs": jnp.asarray(x), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(np.where(seg > 0, positions_of(seg), 0))}


def join_processes(nproc, pid, port) -> None:
  """Joins the local processes of a multi-process test through jax.distributed (gloo
  collectives on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", int(nproc), int(pid))


def tiny_config(corpus_glob: str, data_dir: str, overrides: dict | None = None):
  """A model small enough to compile and step in about a second."""
  from mdlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.update(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_seq_len=64)
  c.data.update(name="text_files", files=corpus_glob, data_dir=data_dir, seq_len=32, prefetch=0)
  c.train.update(steps=4, batch_size=8, learning_rate=3e-3, warmup_steps=1, log_every_steps=1,
                 schedule="constant")
  c.mesh.update(data=1, fsdp=1, tensor=1, allow_unused_devices=True)  # 1 of the 8 devices
  c.checkpoint.update(every_steps=2, keep=3)
  c.eval.update(every_steps=0, batches=2, sample_tokens=16)
  c = config_lib.finalize(c)
  with c.unlocked():
    for key, value in (overrides or {}).items():
      section, _, name = key.rpartition(".")
      (c[section] if section else c)[name] = value
  return c


def sft_config(make_config, pairs_glob, **opts):
  """An `mdlm` LLaDA SFT config on the prompt/answer pairs of `pairs_glob`."""
  return make_config({"objective.name": "mdlm", "objective.sft": True, "objective.llada": True,
                      "data.name": "sft_pairs", "data.files": pairs_glob, "data.seq_len": 16,
                      **{f"objective.{k}": v for k, v in opts.items()}})
