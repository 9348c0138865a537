"""The `star_graph` source: generated path-finding problems on star graphs (Bachmann &
Nagarajan 2024), sized by `data.graph` (degree, path_length, nodes, train/validation
examples). A problem is byte text: shuffled edges 'uv|...|', '/', start and goal, '=', then
the path, each node one symbol. Registered in `builders.SOURCES` on import."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mdlm_jax.data import builders

NODE_SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
GRAPH_QUERY, GRAPH_ANSWER = "/", "="


def check_graph(degree: int, path_length: int, nodes: int) -> None:
  needed = 1 + degree * (path_length - 1)
  if degree < 1 or path_length < 2:
    raise ValueError(f"data.graph: degree={degree} must be >= 1 and path_length={path_length} "
                     ">= 2.")
  if nodes < needed:
    raise ValueError(f"data.graph: a star graph of degree {degree} with arms of path_length "
                     f"{path_length} has {needed} nodes and {needed - 1} edges, more than "
                     f"nodes={nodes} allow; raise data.graph.nodes or lower degree/path_length.")
  if nodes > len(NODE_SYMBOLS):
    raise ValueError(f"data.graph.nodes={nodes}: at most {len(NODE_SYMBOLS)} (one byte-level "
                     "symbol per node).")


def star_graph_tokens(degree: int, path_length: int) -> tuple[int, int]:
  """(prompt, row) lengths of a problem in byte tokens: BOS, 'uv|' per edge, '/', start, goal,
  '=' | the path's nodes and EOS."""
  prompt = 1 + 3 * degree * (path_length - 1) + 4
  return prompt, prompt + path_length + 1


def problem_parts(text):
  """A problem's text (str or bytes) -> (prompt up to and with '=', the path)."""
  cut = text.index(GRAPH_ANSWER if isinstance(text, str) else GRAPH_ANSWER.encode()) + 1
  return text[:cut], text[cut:]


def star_graph(rng: np.random.Generator, degree: int, path_length: int, nodes: int):
  """One problem: `degree` arms of `path_length - 1` edges from a centre on distinct random
  nodes. Returns (text, path): text = shuffled edges 'uv|...|', then '/', start and goal, '=',
  then the path from start to goal, each node one symbol."""
  ids = rng.choice(nodes, 1 + degree * (path_length - 1), replace=False)
  start, arms = ids[0], ids[1:].reshape(degree, path_length - 1)
  edges = [(a, b) for arm in arms for a, b in zip(np.concatenate([[start], arm[:-1]]), arm)]
  edges = [edges[i] for i in rng.permutation(len(edges))]
  path = np.concatenate([[start], arms[rng.integers(degree)]])
  sym = lambda v: NODE_SYMBOLS[int(v)]
  text = ("".join(f"{sym(a)}{sym(b)}|" for a, b in edges) + GRAPH_QUERY + sym(start)
          + sym(path[-1]) + GRAPH_ANSWER + "".join(sym(v) for v in path))
  return text, [int(v) for v in path]


class StarGraphConfig(tfds.core.BuilderConfig):
  def __init__(self, *, degree: int, path_length: int, nodes: int, train_examples: int,
               validation_examples: int, **kwargs):
    super().__init__(**kwargs)
    self.graph = (degree, path_length, nodes)
    self.examples = {"train": train_examples, "validation": validation_examples}


class StarGraph(builders.TextBuilder):
  """Star-graph path finding; validation problems never appear in train."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []
  ROWS = "problems"

  @classmethod
  def check(cls, data_cfg) -> None:
    g = data_cfg.graph
    check_graph(g.degree, g.path_length, g.nodes)
    row = star_graph_tokens(g.degree, g.path_length)[1]
    if data_cfg.tokenizer == "bytes" and data_cfg.seq_len < row:
      raise ValueError(f"data.seq_len={data_cfg.seq_len} is shorter than a star-graph problem "
                       f"of degree {g.degree} and path_length {g.path_length} ({row} tokens); "
                       "raise data.seq_len.")

  @classmethod
  def make_config(cls, data_cfg):
    return star_graph_config(data_cfg.graph)

  def _split_generators(self, dl_manager):
    del dl_manager
    val = {text for _, text in self._problems("validation")}
    return {split: self._generate(split, val) for split in ("train", "validation")}

  def _problems(self, split):
    rng = np.random.default_rng(0 if split == "validation" else 1)
    for i in range(self.builder_config.examples[split]):
      yield i, star_graph(rng, *self.builder_config.graph)[0]

  def _generate(self, split, val):  # pylint: disable=arguments-differ
    for i, text in self._problems(split):
      if split == "validation" or text not in val:
        yield f"{split}:{i}", {"text": text, "key": f"{split}:{i}"}


def star_graph_config(g) -> StarGraphConfig:
  check_graph(g.degree, g.path_length, g.nodes)
  return StarGraphConfig(
      name=f"d{g.degree}_l{g.path_length}_n{g.nodes}_{g.train_examples}_{g.validation_examples}",
      degree=g.degree, path_length=g.path_length, nodes=g.nodes,
      train_examples=g.train_examples, validation_examples=g.validation_examples,
      description="star-graph path finding")


builders.SOURCES["star_graph"] = StarGraph
