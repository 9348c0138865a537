"""The `bst` objective: the chunked all-pairs loss against direct computations, its gradient,
padding and document boundaries, and generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import positions_of
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import bst
from mdlm_jax.objectives import bst_pairs

V = tokenizers.get_tokenizer("bytes").vocab_size
OPTIONS = {
    "separate": {},
    "shared": {"shared_decoders": True},
    "backward_weight": {"backward_weight": 0.3},
    "max_gap": {"max_gap": 4},
    "distance": {"distance_weight": 0.5, "distance_classes": 6},
    "small_chunks": {"pairs_per_chunk": 1},
}


def make(make_config, **opts):
  cfg = make_config({"objective.name": "bst", **{f"objective.{k}": v for k, v in opts.items()}})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(0))


def packed_batch(seed=0, b=3, t=11):
  """Row 0: two documents; row 1: one document then padding; row 2: one full document."""
  rng = np.random.default_rng(seed)
  x = rng.integers(tokenizers.NUM_SPECIAL, V, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[0, 5:] = 2
  seg[1, 8:] = 0
  x[:, 0] = tokenizers.BOS
  x[0, 5] = tokenizers.BOS
  return {"inputs": jnp.asarray(x), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(positions_of(seg))}


def documents(batch):
  seg = np.asarray(batch["segment_ids"])
  for r in range(seg.shape[0]):
    for s in np.unique(seg[r]):
      if s > 0:
        idx = np.flatnonzero(seg[r] == s)
        yield r, idx[0], idx[-1]


def log_softmax(z):
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def reference_loss(net, obj, batch, first_i=None):
  """Every pair (i, j), j - i >= 2, of every document, from states computed on the document
  alone: f_i by F over x_s..x_i, b_j by B over [empty suffix, x_e, ..., x_j]; numpy head.
  first_i: per row, the smallest i (a prompt's last position: answer pairs only)."""
  o, x = obj.opts, np.asarray(batch["inputs"])
  fwd, bwd = net.forward_net, net.backward
  hidden = {m: jax.jit(lambda e, m=m: m.hidden(e, jnp.arange(e.shape[1])[None],
                                               jnp.ones(e.shape[:2], jnp.int32)))
            for m in (fwd, bwd)}
  p = lambda a: np.asarray(a, np.float64)
  text_w1 = np.concatenate([p(net.text.w_f[...]), p(net.text.w_b[...])])
  sums, count = np.zeros(3), 0
  for r, s, e in documents(batch):
    toks = x[r, s:e + 1]
    n = len(toks)
    f = p(hidden[fwd](fwd.embed_tokens(toks[None]))[0])
    b = {}
    for j in range(1, n + 1):
      emb = jnp.concatenate([net.suffix[...][None], bwd.embed_tokens(toks[j:][::-1].copy())])
      b[j] = p(hidden[bwd](emb[None])[0, -1])
    for i in range(0 if first_i is None else first_i[r], n):
      for j in range(i + 2, n + 1):
        if o.max_gap and j - i > o.max_gap:
          continue
        cat = np.concatenate([f[i], b[j]])
        h = cat @ text_w1 + p(net.text.bias[...])
        z = np.where(h > 0, h, 0.01 * h) @ p(net.text.w_out[...]) + p(net.text.b_out[...])
        sums[0] -= log_softmax(z[:V])[toks[i + 1]]
        sums[1] -= log_softmax(z[V:])[toks[j - 1]]
        if net.distance is not None:
          d = net.distance
          h = cat @ np.concatenate([p(d.w_f[...]), p(d.w_b[...])]) + p(d.bias[...])
          z = np.where(h > 0, h, 0.01 * h) @ p(d.w_out[...]) + p(d.b_out[...])
          sums[2] -= log_softmax(z)[min(j - i, o.distance_classes - 1)]
        count += 1
  return (sums[0] + o.backward_weight * sums[1] + o.distance_weight * sums[2]) / count, count


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_chunked_loss_equals_every_pair_computed_directly(make_config, option):
  obj, net = make(make_config, **OPTIONS[option])
  batch = packed_batch()
  loss, metrics = obj.loss(net, batch, jax.random.key(0))
  want, count = reference_loss(net, obj, batch)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["pairs_per_row"]) * 3, count)


def prompted_batch(seed=0):
  """One document per row with a prompt: lengths 11, 8 (then padding), 11; prompts of 4, 3
  and 1 (BOS only) tokens."""
  batch = packed_batch(seed)
  seg = np.asarray(batch["segment_ids"]).copy()
  seg[0] = 1
  x = np.asarray(batch["inputs"]).copy()
  x[0, 5] = 77
  pm = np.zeros_like(seg)
  for r, n in enumerate((4, 3, 1)):
    pm[r, :n] = 1
  return {"inputs": jnp.asarray(x), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(positions_of(seg)), "prompt_mask": jnp.asarray(pm)}


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 11, 12])
@pytest.mark.parametrize("option", ["separate", "max_gap", "distance"])
def test_prompted_rows_train_on_answer_pairs_only(make_config, option, window):
  """With a prompt, only pairs (i, j) with i at or after the prompt's last token count: both
  targets then lie in the answer. The answer window (11: the longest answer plus EOS plus 1)
  gives the same loss and cuts no row."""
  obj, net = make(make_config, answer_window=window, **OPTIONS[option])
  batch = prompted_batch()
  loss, metrics = obj.loss(net, batch, jax.random.key(0))
  want, count = reference_loss(net, obj, batch, first_i=[3, 2, 0])
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["pairs_per_row"]) * 3, count)
  assert float(metrics["rows_cut"]) == 0


@pytest.mark.slow
def test_a_short_answer_window_reports_the_rows_it_cuts(make_config):
  obj, net = make(make_config, answer_window=9)  # answers: 7, 5 and 10 tokens, EOS included
  _, metrics = obj.loss(net, prompted_batch(), jax.random.key(0))
  np.testing.assert_allclose(float(metrics["rows_cut"]), 1 / 3)  # row 2 (10 + 1 > 9)


def direct_loss(obj, net, batch):
  """The same loss, all pairs materialised at once from explicit (i, j) lists (jnp)."""
  o = obj.opts
  f, b_slots = net.states(batch["inputs"], batch["positions"], batch["segment_ids"])
  x = batch["inputs"]
  rows, fi, bj = [], [], []
  for r, s, e in documents(batch):
    for i in range(s, e + 1):
      for j in range(i + 2, e + 2):
        if not o.max_gap or j - i <= o.max_gap:
          rows.append(r), fi.append(i), bj.append(j)
  rows, fi, bj = (jnp.asarray(a) for a in (rows, fi, bj))
  fb = jnp.concatenate([f[rows, fi], b_slots[rows, bj - 1]], axis=-1)

  def head(hd, out_slices):
    h = bst_pairs.leaky(fb @ jnp.concatenate([hd.w_f[...], hd.w_b[...]]) + hd.bias[...])
    z = h @ hd.w_out[...] + hd.b_out[...]
    return [jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(z[:, lo:hi]), y[:, None], 1))
            for (lo, hi), y in out_slices]

  ce_f, ce_b = head(net.text, [((0, V), x[rows, fi + 1]), ((V, 2 * V), x[rows, bj - 1])])
  loss = ce_f + o.backward_weight * ce_b
  if net.distance is not None:
    k = o.distance_classes
    loss += o.distance_weight * head(net.distance, [((0, k), jnp.minimum(bj - fi, k - 1))])[0]
  return loss


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_gradient_equals_the_direct_all_pairs_gradient(make_config, option):
  obj, net = make(make_config, **OPTIONS[option])
  graphdef, params = nnx.split(net)
  batch = packed_batch(seed=1)
  ours = jax.grad(lambda p: obj.loss(nnx.merge(graphdef, p), batch, jax.random.key(0))[0])(
      params)
  want = jax.grad(lambda p: direct_loss(obj, nnx.merge(graphdef, p), batch))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(ours))


@pytest.mark.slow
def test_pairs_touching_padding_or_another_document_contribute_nothing(make_config):
  obj, net = make(make_config)
  batch = packed_batch()
  loss, _ = obj.loss(net, batch, jax.random.key(0))
  x = np.asarray(batch["inputs"]).copy()
  x[1, 8:] = np.random.default_rng(5).integers(tokenizers.NUM_SPECIAL, V, 3)  # padding
  loss2, _ = obj.loss(net, dict(batch, inputs=jnp.asarray(x)), jax.random.key(0))
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  # pairs counted: L (L - 1) / 2 per document, none across the two documents of row 0
  sums = bst.pair_loss(obj.spec(11), *obj.pair_inputs(net, batch), obj.slots(None, 3, 11))[1]
  assert float(sums[-1]) == 5 * 4 / 2 + 6 * 5 / 2 + 8 * 7 / 2 + 11 * 10 / 2


@pytest.mark.slow
def test_no_backward_state_reads_past_its_document_or_its_own_target(make_config):
  obj, net = make(make_config)
  batch = packed_batch()
  seg = batch["segment_ids"]
  emb = net.backward.embed_tokens(batch["inputs"])

  def slot_state(e, r, k):
    inputs = net.backward_inputs(e, seg)
    return jnp.sum(jnp.flip(net.backward.hidden(*inputs, causal=True), 1)[r, k])

  for r, s, e in documents(batch):
    for k in range(s, e + 1):
      g = np.abs(np.asarray(jax.grad(slot_state)(emb, r, k))).sum(-1)   # (B, T)
      reads = np.flatnonzero(g[r] > 0)
      assert set(reads) <= set(range(k + 1, e + 1)), (r, k, reads)
      assert np.all(np.delete(g, r, axis=0) == 0)
      if k < e:
        assert k + 1 in reads  # it does read the suffix


@pytest.mark.slow
def test_pair_fraction_keeps_whole_gap_slots_with_equal_chance(make_config):
  obj, net = make(make_config, pair_fraction=0.25)
  n, rows = 32, 4000
  slots = np.asarray(obj.slots(jax.random.key(3), rows, n, 0.25))
  assert slots.shape == (rows, 4)  # 16 slots, a quarter kept
  assert all(len(set(r)) == 4 for r in slots[:50])
  freq = np.bincount(slots.ravel(), minlength=17)[1:] / rows
  np.testing.assert_allclose(freq, 0.25, atol=0.03)
  # the loss counts exactly the pairs whose gap min(d, n - d) is a kept slot
  batch = packed_batch()
  _, m = obj.loss(net, batch, jax.random.key(7))
  kept = np.asarray(obj.slots(jax.random.key(7), 3, 11, 0.25))
  want = 0
  for r, s, e in documents(batch):
    for i in range(s, e + 1):
      for k in range(i + 1, e + 1):
        want += min(k - i, 11 - (k - i)) in kept[r]
  np.testing.assert_allclose(float(m["pairs_per_row"]) * 3, want)


@pytest.mark.slow
def test_every_pair_is_enumerated_exactly_once():
  for n in (2, 3, 8, 9):
    for max_k in range(1, n):
      slots = jnp.arange(1, bst.gap_slots(n, max_k) + 1)[None]
      fi, bk, gap, ok = (np.asarray(a)[0] for a in bst_pairs.pair_lanes(slots, n))
      got = sorted(zip(fi[ok & (gap <= max_k)], bk[ok & (gap <= max_k)]))
      want = [(i, k) for i in range(n) for k in range(i + 1, min(n, i + max_k + 1))]
      assert got == want and np.all(bk - fi == gap)


@pytest.mark.parametrize("bad", [{"pair_fraction": 0.0}, {"pair_fraction": 1.5},
                                 {"max_gap": 1}, {"backward_weight": -1.0}])
def test_bad_options_are_refused(make_config, bad):
  from mdlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  key = next(iter(bad))
  with pytest.raises(ValueError, match=f"objective.{key}"):
    config_lib.validate(make_config({"objective.name": "bst",
                                     **{f"objective.{k}": v for k, v in bad.items()}}))


@pytest.mark.slow
def test_empty_suffix_likelihood_is_a_left_to_right_factorisation(make_config):
  """eval `nll` = sum of -log p(x_{i+1} | f_i, empty suffix), checked position by position."""
  obj, net = make(make_config)
  batch = packed_batch()
  sums = obj.eval_sums(net, batch, jax.random.key(0))
  x = np.asarray(batch["inputs"])
  total, tokens = 0.0, 0
  empty = net.suffix_state(jnp.zeros((1, 0), jnp.int32))[:, -1]
  forward = jax.jit(lambda t: net.forward_states(t, jnp.arange(t.shape[1])[None],
                                                 jnp.ones(t.shape, jnp.int32)))
  for r, s, e in documents(batch):
    toks = x[r, s:e + 1]
    f = forward(toks[None])
    a, c = net.text.first_f(f), net.text.first_b(empty[:, None])
    logp = jax.nn.log_softmax(bst.head_logits(a, c, net.text.w_out[...][:, :V],
                                              net.text.b_out[...][:V]))[0]
    total -= float(jnp.sum(logp[jnp.arange(len(toks) - 1), toks[1:]]))
    tokens += len(toks) - 1
  np.testing.assert_allclose(float(sums["nll"]), total, rtol=1e-5)
  assert float(sums["tokens"]) == tokens


@pytest.mark.slow
def test_cached_decoding_equals_uncached_and_keeps_the_prefix(make_config):
  obj, net = make(make_config)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(np.concatenate([[[tokenizers.BOS]] * 2, rng.integers(20, 200, (2, 4))],
                                      axis=1), jnp.int32)
  suffix = jnp.asarray(rng.integers(20, 200, (2, 3)), jnp.int32)
  out = np.asarray(jax.jit(lambda p, s: obj.generate(
      net, p, jax.random.key(0), max_new_tokens=6, temperature=0.0, suffix_BxS=s))(prompt,
                                                                                   suffix))
  np.testing.assert_array_equal(out[:, :5], prompt)
  # greedy: every generated token is the argmax of one uncached (causal) pass over the rows
  c = net.text.first_b(net.suffix_state(suffix)[:, -1:])
  row = jnp.asarray(out)
  f = net.forward_states(row, jnp.broadcast_to(jnp.arange(row.shape[1]), row.shape),
                         jnp.ones_like(row))
  logits = bst.head_logits(net.text.first_f(f), c, net.text.w_out[...][:, :V],
                           net.text.b_out[...][:V])
  np.testing.assert_array_equal(out[:, 5:], np.argmax(logits[:, 4:-1], -1))


@pytest.mark.slow
def test_candidate_score_is_the_backward_heads_likelihood_of_the_middle(make_config):
  """Scoring [prefix | middle | suffix] equals the sum of the training loss's backward terms
  of the pairs (prefix end, each middle token) on the same row."""
  obj, net = make(make_config)
  rng = np.random.default_rng(1)
  row = np.concatenate([[tokenizers.BOS], rng.integers(20, 200, 9)]).astype(np.int32)
  p, l = 3, 4  # prefix x_0..x_2, middle x_3..x_6, suffix x_7..x_9
  score = obj.middle_log_likelihood(net, jnp.asarray(row[None, :p]),
                                    jnp.asarray(row[None, p:p + l]), jnp.asarray(row[None, p + l:]))
  batch = {"inputs": jnp.asarray(row[None]), "segment_ids": jnp.ones((1, 10), jnp.int32),
           "positions": jnp.arange(10)[None]}
  f, b_slots = net.states(batch["inputs"], batch["positions"], batch["segment_ids"])
  a, c = net.text.first_f(f[:, p - 1]), net.text.first_b(b_slots[0, p:p + l])
  logp = jax.nn.log_softmax(bst.head_logits(a, c, net.text.w_out[...][:, V:],
                                            net.text.b_out[...][V:]))
  want = float(jnp.sum(logp[jnp.arange(l), row[p:p + l]]))
  np.testing.assert_allclose(float(score[0]), want, rtol=1e-5)


@pytest.mark.slow
def test_scores_and_samples_of_a_batch_are_those_of_each_row(make_config):
  """Rows of different middles and lengths score in a batch as they do alone; no suffix is
  the empty one."""
  obj, net = make(make_config)
  eos, pad = tokenizers.EOS, tokenizers.PAD
  prompt = jnp.asarray([[tokenizers.BOS, 40, 41], [tokenizers.BOS, 50, 51]], jnp.int32)
  middle = jnp.asarray([[70, 71, 72, eos], [80, eos, pad, pad]], jnp.int32)
  suffix = jnp.asarray([[60, 61], [62, 63]], jnp.int32)
  lengths = jnp.asarray([2, 1])
  backward = jax.jit(lambda *a: obj.middle_log_likelihood(net, *a))
  completed = jax.jit(lambda *a: obj.completed_log_likelihood(net, *a))
  both = backward(prompt, middle, suffix)
  done = completed(prompt, middle, suffix, lengths)
  for r in range(2):
    one = lambda fn, *a: float(fn(prompt[r:r + 1], middle[r:r + 1], suffix[r:r + 1], *a)[0])
    np.testing.assert_allclose(float(both[r]), one(backward), rtol=1e-5)
    np.testing.assert_allclose(float(done[r]), one(completed, lengths[r:r + 1]), rtol=1e-5)
  gen = jax.jit(lambda s: obj.generate(net, prompt, jax.random.key(3), max_new_tokens=3,
                                       suffix_BxS=s))
  np.testing.assert_array_equal(gen(None), gen(jnp.zeros((2, 0), jnp.int32)))


@pytest.mark.slow
def test_completed_text_likelihood_is_the_forward_likelihood_of_each_length(make_config):
  """completed_log_likelihood(L) = the forward log-likelihood of m[:L] + suffix after the
  prefix: -nll(prefix + m[:L] + suffix) + nll(prefix), for every L."""
  obj, net = make(make_config)
  prompt = np.asarray([tokenizers.BOS, 40, 41], np.int32)
  middle = np.asarray([70, 71, 72, 73], np.int32)
  suffix = np.asarray([60, 61], np.int32)
  l = len(middle)
  got = obj.completed_log_likelihood(net, jnp.asarray(np.tile(prompt, (l + 1, 1))),
                                     jnp.asarray(np.tile(middle, (l + 1, 1))),
                                     jnp.asarray(np.tile(suffix, (l + 1, 1))),
                                     jnp.arange(l + 1))
  width = len(prompt) + l + len(suffix)
  eval_nll = jax.jit(lambda x, seg: obj.eval_sums(
      net, {"inputs": x, "segment_ids": seg, "positions": jnp.arange(width)[None]},
      jax.random.key(0))["nll"])

  def nll(row):   # one compiled width: the row, then padding in no document
    x = np.full((1, width), tokenizers.PAD, np.int32)
    x[0, :len(row)] = row
    return float(eval_nll(jnp.asarray(x), jnp.asarray(x != tokenizers.PAD, jnp.int32)))
  for n in range(l + 1):
    want = nll(prompt) - nll(np.concatenate([prompt, middle[:n], suffix]))
    np.testing.assert_allclose(float(got[n]), want, rtol=1e-5)


@pytest.mark.slow
def test_candidates_are_ranked_by_the_backward_score(make_config):
  obj, net = make(make_config)
  prompt = jnp.full((1, 1), tokenizers.BOS, jnp.int32)
  suffix = jnp.asarray([[60, 61]], jnp.int32)
  gen = jax.jit(lambda p, s, k: obj.generate(net, p, jax.random.key(4), max_new_tokens=5,
                                             suffix_BxS=s, num_candidates=k), static_argnums=2)
  best = gen(prompt, suffix, 6)
  # the same draws, unranked (the candidates are the rows of one batched sample)
  all6 = gen(jnp.repeat(prompt, 6, 0), jnp.repeat(suffix, 6, 0), 1)
  scores = obj.middle_log_likelihood(net, jnp.repeat(prompt, 6, 0), all6[:, 1:],
                                     jnp.repeat(suffix, 6, 0))
  np.testing.assert_array_equal(best[0], all6[int(jnp.argmax(scores))])


@pytest.mark.slow
def test_candidate_score_reads_a_middle_up_to_its_first_eos(make_config):
  """[70, EOS] scores the same with PAD or anything after its EOS, and what it scores equals
  the backward terms of the row where [70, EOS] meets the empty suffix directly."""
  obj, net = make(make_config)
  eos, pad = tokenizers.EOS, tokenizers.PAD
  prompt = jnp.asarray([[tokenizers.BOS, 40, 41]], jnp.int32)
  empty = jnp.zeros((1, 0), jnp.int32)
  score = lambda m: float(obj.middle_log_likelihood(net, prompt, jnp.asarray([m], jnp.int32),
                                                    empty)[0])
  short = score([70, eos])
  for longer in ([70, eos, pad, pad, pad], [70, eos, 99, 98, eos], [70, pad, pad]):
    np.testing.assert_allclose(score(longer), short, rtol=1e-6)
  row = np.array([tokenizers.BOS, 40, 41, 70, eos], np.int32)
  f, b_slots = net.states(jnp.asarray(row[None]), jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))
  a, c = net.text.first_f(f[:, 2]), net.text.first_b(b_slots[0, 3:5])
  logp = jax.nn.log_softmax(bst.head_logits(a, c, net.text.w_out[...][:, V:],
                                            net.text.b_out[...][V:]))
  np.testing.assert_allclose(short, float(logp[0, 70] + logp[1, eos]), rtol=1e-5)


@pytest.mark.slow
def test_a_middle_ends_where_the_completed_text_is_most_likely(make_config):
  """end='best' cuts each middle at the L whose prefix + m[:L] + suffix has the highest forward
  likelihood, computed here with `eval_sums` on each completed row; rows end before
  max_new_tokens."""
  obj, net = make(make_config)
  rng = np.random.default_rng(2)
  b, p, m, s = 4, 3, 6, 3
  prompt = np.concatenate([np.full((b, 1), tokenizers.BOS), rng.integers(20, 200, (b, p - 1))],
                          1).astype(np.int32)
  suffix = rng.integers(20, 200, (b, s)).astype(np.int32)
  fixed = np.asarray(jax.jit(lambda: obj.generate(
      net, jnp.asarray(prompt), jax.random.key(5), max_new_tokens=m, suffix_BxS=jnp.asarray(
          suffix), end="fixed"))())
  best = np.asarray(jax.jit(lambda: obj.generate(
      net, jnp.asarray(prompt), jax.random.key(5), max_new_tokens=m, suffix_BxS=jnp.asarray(
          suffix), end="best"))())
  # every completed row, padded to one width, scored by one jitted eval_sums per row
  width = p + m + s
  rows = np.full((b, m + 1, width), tokenizers.PAD, np.int32)
  seg = np.zeros((b, m + 1, width), np.int32)
  for r in range(b):
    for n in range(m + 1):
      row = np.concatenate([prompt[r], fixed[r, p:p + n], suffix[r]])
      rows[r, n, :len(row)], seg[r, n, :len(row)] = row, 1
  nll_of = jax.jit(jax.vmap(lambda x, sg: obj.eval_sums(
      net, {"inputs": x[None], "segment_ids": sg[None], "positions": jnp.arange(width)[None]},
      jax.random.key(0))["nll"]))
  nll = np.asarray(nll_of(jnp.asarray(rows.reshape(-1, width)),
                          jnp.asarray(seg.reshape(-1, width)))).reshape(b, m + 1)
  lengths = []
  for r in range(b):
    n = int(np.argmin(nll[r]))
    lengths.append(n)
    np.testing.assert_array_equal(best[r, p:p + n], fixed[r, p:p + n])
    assert (best[r, p + n:] == tokenizers.PAD).all()
  assert min(lengths) < m, lengths
  # with K candidates the kept one has the most likely completed text among the K
  k = 3
  gen = lambda kk, pr, su: obj.generate(net, pr, jax.random.key(6), max_new_tokens=m,
                                        suffix_BxS=su, end="best", num_candidates=kk)
  one = np.asarray(jax.jit(lambda: gen(k, jnp.asarray(prompt[:1]), jnp.asarray(suffix[:1])))())
  each = jax.jit(lambda: gen(1, jnp.repeat(jnp.asarray(prompt[:1]), k, 0),
                             jnp.repeat(jnp.asarray(suffix[:1]), k, 0)))()
  lens = jnp.sum(each[:, p:] != tokenizers.PAD, axis=1)
  scores = obj.completed_log_likelihood(net, jnp.repeat(jnp.asarray(prompt[:1]), k, 0),
                                        each[:, p:], jnp.repeat(jnp.asarray(suffix[:1]), k, 0),
                                        lens)
  np.testing.assert_array_equal(one[0], np.asarray(each)[int(jnp.argmax(scores))])
  with pytest.raises(ValueError, match="end='last'"):
    obj.generate(net, jnp.asarray(prompt), jax.random.key(0), max_new_tokens=2, end="last")
