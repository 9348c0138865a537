"""Star-graph data, fill-in-the-middle data for `ar`, unpacked rows, and the generation tasks."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm_jax import config as config_lib
from mdlm_jax import tasks
from mdlm_jax import tokenizers
from mdlm_jax import trainer
from mdlm_jax.data import builders
from mdlm_jax.data import star_graph as sg
from mdlm_jax.data import pipeline

TOK = tokenizers.get_tokenizer("bytes")
SYM = {s: i for i, s in enumerate(sg.NODE_SYMBOLS)}


def parse(text):
  edges, query = text.split(sg.GRAPH_QUERY)
  ends, path = query.split(sg.GRAPH_ANSWER)
  pairs = [(SYM[e[0]], SYM[e[1]]) for e in edges.split("|") if e]
  return pairs, SYM[ends[0]], SYM[ends[1]], [SYM[c] for c in path]


def paths_between(pairs, start, goal):
  """Every simple directed path from start to goal (depth-first)."""
  out, children = [], collections.defaultdict(list)
  for a, b in pairs:
    children[a].append(b)
  stack = [[start]]
  while stack:
    p = stack.pop()
    if p[-1] == goal:
      out.append(p)
    stack += [p + [c] for c in children[p[-1]] if c not in p]
  return out


@pytest.mark.parametrize("degree,length,nodes", [(2, 5, 50), (5, 5, 50), (3, 2, 4), (1, 6, 62)])
def test_star_graph_paths_are_valid_and_unique(degree, length, nodes):
  rng = np.random.default_rng(0)
  for _ in range(200):
    text, path = sg.star_graph(rng, degree, length, nodes)
    pairs, start, goal, written = parse(text)
    assert written == path and len(path) == length and path[0] == start and path[-1] == goal
    assert len(pairs) == degree * (length - 1) and len(set(pairs)) == len(pairs)
    assert len({v for e in pairs for v in e}) == 1 + degree * (length - 1)  # distinct nodes
    assert sum(a == start for a, _ in pairs) == degree  # the centre has `degree` arms
    assert paths_between(pairs, start, goal) == [path]  # the only path


def test_star_graph_edge_order_is_shuffled():
  rng = np.random.default_rng(1)
  graphs = [parse(sg.star_graph(rng, 2, 5, 50)[0]) for _ in range(400)]
  share = np.mean([pairs[0][0] == start for pairs, start, _, _ in graphs])
  assert 0.15 < share < 0.35  # the first listed edge leaves the centre for 2 of 8 edges


@pytest.mark.parametrize("graph,msg", [((2, 5, 8), "more than nodes=8 allow"),
                                       ((2, 5, 99), "at most 62"), ((0, 5, 50), "degree=0")])
def test_impossible_star_graphs_are_refused(make_config, graph, msg):
  cfg = make_config({"data.name": "star_graph", "data.graph.degree": graph[0],
                     "data.graph.path_length": graph[1], "data.graph.nodes": graph[2]})
  with pytest.raises(config_lib.ConfigError, match=msg):
    config_lib.validate(cfg)


def test_star_graph_builder_splits_are_disjoint(make_config):
  cfg = make_config({"data.name": "star_graph", "data.graph.train_examples": 300,
                     "data.graph.validation_examples": 50, "data.graph.nodes": 12})
  builder = builders.load_builder(cfg.data)
  texts = {s: {builders.text_of(r).decode() for r in builders.data_source(builder, s)}
           for s in ("train", "validation")}
  assert len(texts["validation"]) == 50 and 250 <= len(texts["train"]) <= 300
  assert not texts["train"] & texts["validation"]


def test_fim_permutation_moves_the_middle_last():
  rng = np.random.default_rng(0)
  body = np.arange(100, 120, dtype=np.int32)
  ids = np.concatenate([[tokenizers.BOS], body, [tokenizers.EOS]])
  cuts = []
  for _ in range(300):
    out = pipeline.fim_permute(ids, rng)
    assert len(out) == len(ids) + 3 and out[0] == tokenizers.BOS and out[-1] == tokenizers.EOS
    p, s, m = (int(np.flatnonzero(out == t)[0]) for t in
               (tokenizers.FIM_PREFIX, tokenizers.FIM_SUFFIX, tokenizers.FIM_MIDDLE))
    assert p == 1 < s < m
    prefix, suffix, middle = out[2:s], out[s + 1:m], out[m + 1:-1]
    np.testing.assert_array_equal(np.concatenate([prefix, middle, suffix]), body)
    cuts.append(len(prefix))
  assert 0 in cuts and len(set(cuts)) > 10  # cut points spread over the document


def test_fim_rate_share_of_training_documents(make_config):
  src = builders.data_source(builders.load_builder(make_config().data), "train")
  it = iter(pipeline.make_dataset(src, TOK, seq_len=32, batch_size=8, seed=0, train=True,
                                  prefetch=0, pack=False, transforms=(pipeline.Fim(0.5),)))
  rows = np.concatenate([next(it)["inputs"] for _ in range(40)])
  share = np.mean(rows[:, 1] == tokenizers.FIM_PREFIX)
  assert 0.4 < share < 0.6
  it = iter(pipeline.make_dataset(src, TOK, seq_len=32, batch_size=8, seed=0, train=False,
                                  prefetch=0, pack=False, transforms=(pipeline.Fim(0.5),)))
  assert not np.any(next(it)["inputs"] == tokenizers.FIM_PREFIX)  # evaluation stays plain


def test_unpacked_rows_hold_one_document_then_padding(make_config):
  src = builders.data_source(builders.load_builder(make_config().data), "train")
  it = iter(pipeline.make_dataset(src, TOK, seq_len=32, batch_size=8, seed=0, train=True,
                                  prefetch=0, pack=False))
  b = next(it)
  for x, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"]):
    n = int(seg.sum())
    assert x[0] == tokenizers.BOS and set(seg[:n]) == {1} and not seg[n:].any()
    np.testing.assert_array_equal(pos[:n], np.arange(n))
    assert n == 32 or x[n - 1] == tokenizers.EOS


@pytest.mark.parametrize("objective,extra", [("ar", {"objective.fim_rate": 0.5}), ("bst", {}),
                                             ("mdlm", {})])
@pytest.mark.slow
def test_fill_middle_keeps_length_and_is_greedy(make_config, objective, extra):
  cfg = make_config({"objective.name": objective, **extra})
  setup = trainer.build(cfg)
  model = nnx.merge(setup.graphdef, setup.init_params())
  rng = np.random.default_rng(0)
  prefix = np.concatenate([[[tokenizers.BOS]] * 3, rng.integers(20, 200, (3, 5))], 1)
  suffix = rng.integers(20, 200, (3, 4))
  fn = jax.jit(lambda p, s, k: tasks.fill_middle(setup, model, p, s, 6, k))
  a = np.asarray(fn(jnp.asarray(prefix, jnp.int32), jnp.asarray(suffix, jnp.int32),
                    jax.random.key(0)))
  b = np.asarray(fn(jnp.asarray(prefix, jnp.int32), jnp.asarray(suffix, jnp.int32),
                    jax.random.key(1)))
  assert a.shape == (3, 6) and not np.any(a == tokenizers.MASK)
  np.testing.assert_array_equal(a, b)  # greedy: the key does not matter


@pytest.mark.slow
def test_plain_ar_cannot_infill(make_config):
  setup = trainer.build(make_config({"objective.name": "ar"}))
  model = nnx.merge(setup.graphdef, setup.init_params())
  x = jnp.ones((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="fim_rate"):
    tasks.fill_middle(setup, model, x, x, 4, jax.random.key(0))


def test_fim_prompt_is_prefix_suffix_middle(make_config):
  """The FIM model sees [BOS, <fim_prefix>, prefix, <fim_suffix>, suffix, <fim_middle>]."""
  cfg = make_config({"objective.name": "ar", "objective.fim_rate": 0.5})
  setup = trainer.build(cfg)
  seen = []

  class Recorder:
    def init_cache(self, b, n):
      return jnp.zeros((b, n), jnp.int32)

    def decode(self, tokens, cache):
      seen.append(tokens)
      return jnp.zeros(tokens.shape + (setup.tokenizer.vocab_size,)), cache

  prefix, suffix = jnp.asarray([[tokenizers.BOS, 50, 51]]), jnp.asarray([[60, 61]])
  out = setup.objective.generate(Recorder(), prefix, jax.random.key(0), max_new_tokens=2,
                                 temperature=0.0, suffix_BxS=suffix)
  np.testing.assert_array_equal(seen[0][0], [tokenizers.BOS, tokenizers.FIM_PREFIX, 50, 51,
                                             tokenizers.FIM_SUFFIX, 60, 61, tokenizers.FIM_MIDDLE])
  assert out.shape == (1, 5) and list(out[0, :3]) == [tokenizers.BOS, 50, 51]


def star_graph_config(make_config, objective="ar", **overrides):
  """configs/star_graph.py with the tiny test model and a small generated dataset."""
  from configs import star_graph  # pylint: disable=g-import-not-at-top
  cfg = star_graph.get_config(objective)
  small = make_config()
  with cfg.unlocked():
    cfg.data.data_dir = small.data.data_dir
    cfg.model.update({k: small.model[k] for k in ("num_layers", "d_model", "num_heads",
                                                  "mlp_dim")})
  for key, value in {"data.graph.train_examples": 300, "data.graph.validation_examples": 40,
                     "data.graph.nodes": 20, **overrides}.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize("degree,length", [(2, 5), (3, 4)])
def test_star_graph_rows_are_prompt_then_path(make_config, degree, length):
  cfg = star_graph_config(make_config, "bst", **{"data.graph.degree": degree,
                                                 "data.graph.path_length": length})
  prompt_len, row_len = sg.star_graph_tokens(degree, length)
  assert cfg.data.seq_len == row_len and cfg.objective.answer_window == length + 2
  config_lib.validate(cfg)
  it = iter(pipeline.train_dataset(cfg, TOK))
  batch = next(it)
  it.close()
  assert set(batch) == set(pipeline.PROMPT_KEYS)
  for x, seg, pm in zip(batch["inputs"], batch["segment_ids"], batch["prompt_mask"]):
    assert seg.all() and pm.sum() == prompt_len and not pm[prompt_len:].any()
    text = TOK.decode(x[1:-1])
    assert text[prompt_len - 2] == sg.GRAPH_ANSWER and x[-1] == tokenizers.EOS
    pairs, start, goal, path = parse(text)
    assert paths_between(pairs, start, goal) == [path] and len(path) == length
  it.close()


def test_star_graph_rows_must_fit(make_config):
  cfg = star_graph_config(make_config)
  with cfg.unlocked():
    cfg.data.seq_len = 30
  with pytest.raises(config_lib.ConfigError, match="shorter than a star-graph problem"):
    config_lib.validate(cfg)


def test_star_graph_path_accuracy_scores_whole_paths(make_config, monkeypatch):
  """The evaluation's prompts end at '=' and its answers are the paths: a decoder that answers
  every third problem wrong in its second node scores exactly the rest."""
  cfg = star_graph_config(make_config)
  setup = trainer.build(cfg)
  source = builders.data_source(builders.load_builder(cfg.data), "validation")
  truth = {}
  for i in range(len(source)):
    text = builders.text_of(source[i]).decode()
    cut = text.index(sg.GRAPH_ANSWER) + 1
    truth[text[:cut]] = TOK.encode(text[cut:])

  def fake_filler(setup_, length):
    def fn(params, prefixes, suffixes, rng):
      del params, rng
      assert suffixes.shape[1] == 0
      out = np.stack([truth[TOK.decode(p[1:])] for p in prefixes])
      assert out.shape[1] == length
      for k, p in enumerate(prefixes):
        if sum(map(ord, TOK.decode(p[1:]))) % 3 == 0:
          out[k, 1] = out[k, 1] + 1
      return out
    return fn

  monkeypatch.setattr(tasks, "_filler", fake_filler)
  result = tasks.star_graph_eval(setup, max_examples=-1, batch=16)(None)
  wrong = np.mean([sum(map(ord, p)) % 3 == 0 for p in truth])
  assert result["examples"] == len(truth) == 40
  np.testing.assert_allclose(result["path_accuracy"], 1 - wrong)
  np.testing.assert_allclose(result["first_step_accuracy"], 1 - wrong)
  assert 0 < wrong < 1


@pytest.mark.slow
def test_training_on_star_graphs_reports_path_accuracy(make_config, tmp_path):
  cfg = star_graph_config(make_config, "bst", **{"train.steps": 4, "train.batch_size": 8,
                                                 "eval.every_steps": 4, "eval.batches": 1,
                                                 "eval.task_examples": 10,
                                                 "checkpoint.every_steps": 4})
  lines = []
  last = trainer.train(cfg, str(tmp_path), log=lines.append)
  assert any(l.startswith("star graph @ step 4: path accuracy") for l in lines)
  # a right path starts with a right first step
  assert 0.0 <= last["eval/path_accuracy"] <= last["eval/first_step_accuracy"] <= 1.0


# ---------------------------------------------------------------- generative perplexity
def test_unigram_entropy_is_the_direct_count():
  sample = [5, 5, 9, 7, 5, 9]
  p = np.array([3, 2, 1]) / 6
  np.testing.assert_allclose(tasks.unigram_entropy(sample), -(p * np.log(p)).sum(), rtol=1e-12)
  assert tasks.unigram_entropy([4, 4, 4]) == 0.0


def test_gen_ppl_of_the_scorers_own_samples_is_its_perplexity_on_them(make_config):
  """Samples drawn from the ar scorer itself, scored by it: exp of the mean NLL per token,
  each token's term taken here from a plain forward pass over the sample (EOS scored when a
  sample has one), and the mean entropy of each sample's own token counts."""
  setup = trainer.build(make_config({"objective.name": "ar", "model.init_std": 0.3}))
  params = setup.init_params()
  got = tasks.gen_ppl(setup, params, setup, params, 6, 20, seed=3, temperature=1.0)
  samples = tasks.draw_samples(setup, params, 6, 20, seed=3, temperature=1.0)
  model = nnx.merge(setup.graphdef, params)
  nll = tokens = 0.0
  for s in samples:
    row = jnp.asarray(np.concatenate([[tokenizers.BOS], s])[None], jnp.int32)
    pos = jnp.arange(row.shape[1])[None]
    logp = jax.nn.log_softmax(model(row, pos, jnp.ones_like(row)), axis=-1)[0]
    nll -= float(jnp.sum(logp[jnp.arange(len(s)), row[0, 1:]]))
    tokens += len(s)
  np.testing.assert_allclose(got["gen_ppl"], np.exp(nll / tokens), rtol=1e-5)
  assert got["tokens_scored"] == tokens and got["samples"] == 6
  counts = [collections.Counter(s.tolist()) for s in samples]
  ent = [-sum(c / len(s) * np.log(c / len(s)) for c in cnt.values())
         for s, cnt in zip(samples, counts)]
  np.testing.assert_allclose(got["entropy"], np.mean(ent), rtol=1e-9)
  assert all(len(s) <= 20 and not np.any(s[:-1] == tokenizers.EOS) for s in samples)


def test_gen_ppl_scorer_must_be_ar(make_config):
  setup = trainer.build(make_config({"objective.name": "mdlm"}))
  with pytest.raises(ValueError, match="--scorer must be an ar workdir"):
    tasks.score_samples(setup, setup.init_params(), [np.array([40, 41])])
