"""The `insertion` objective (Insertion Transformer with FPE): canvases, slots and span weights
against a walk over the documents, the losses against numpy over the network's outputs, the
FPE placement against its recursion, the bound against an enumeration of every insertion
order, and the samplers."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import packed_batch
from mdlm_jax import config as config_lib
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import blm
from mdlm_jax.objectives import insertion as ins
from mdlm_jax.objectives import insertion_canvas as canvas_lib
from mdlm_jax.objectives import insertion_decoding as dec

BOS, EOS, PAD = tokenizers.BOS, tokenizers.EOS, tokenizers.PAD


def make(make_config, **opts):
  cfg = make_config({"objective.name": "insertion",
                     **{f"objective.{k}": v for k, v in opts.items()}})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(0))


def with_cut_row(batch, t):
  """Adds a row holding a document cut at both edges (no BOS, no EOS) and a one-token one."""
  x = np.full((1, t), PAD, np.int32)
  seg = np.zeros((1, t), np.int32)
  x[0, :6], seg[0, :6] = [70, 71, 72, 73, 74, 75], 1
  x[0, 6], seg[0, 6] = 80, 2
  pos = np.where(seg > 0, np.array([[0, 1, 2, 3, 4, 5, 0] + [0] * (t - 7)]), 0)
  cat = lambda a, b: jnp.concatenate([a, jnp.asarray(b, jnp.int32)], axis=0)
  return {"inputs": cat(batch["inputs"], x), "segment_ids": cat(batch["segment_ids"], seg),
          "positions": cat(batch["positions"], pos)}


DOCS = [[[40, 41, 42, 43, 44], [50, 51, 52]], [[60, 61, 62, 63, 64, 65]]]


def reference(batch, keep, order, tau):
  """Per row, a walk over its segments: the canvas, and per missing word (row, index) its slot
  (the canvas index of its left neighbour) and its weight in that slot's span."""
  x, seg = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
  canvases, targets = [], {}
  for r in range(x.shape[0]):
    canvas, c_seg = [], []
    t = 0
    while t < x.shape[1] and seg[r, t] > 0:
      end = t
      while end + 1 < x.shape[1] and seg[r, end + 1] == seg[r, t]:
        end += 1
      span = []
      for i in range(t, end + 1):
        anchor = i in (t, end) or x[r, i] in (BOS, EOS)
        if anchor or keep[r, i]:
          for j, m in enumerate(span):  # close the open span
            c = (len(span) - 1) / 2
            w = (np.exp(-abs(j - c) / tau) / sum(np.exp(-abs(q - c) / tau)
                                                  for q in range(len(span)))
                 if order == "tree" else 1 / len(span))
            targets[(r, m)] = (len(canvas) - 1, w)
          span = []
          canvas.append(x[r, i])
          c_seg.append(seg[r, i])
        else:
          span.append(i)
      t = end + 1
    canvases.append((canvas, c_seg))
  return canvases, targets


@pytest.mark.slow
@pytest.mark.parametrize("order,tau", [("tree", 1.0), ("tree", 0.4), ("uniform", 1.0)])
def test_canvas_slots_and_span_weights_match_a_walk_over_the_documents(order, tau):
  t = 16
  batch = with_cut_row(packed_batch(DOCS, t), t)
  keep = np.random.default_rng(0).random(batch["inputs"].shape) < 0.4
  canvas, missing, slot, span_idx, span_len = ins.canvas_of(batch, jnp.asarray(keep))
  w = ins.span_weights(span_idx, span_len, ins.span_key(missing, slot), order, tau)
  canvases, targets = reference(batch, keep, order, tau)
  for r, (c, c_seg) in enumerate(canvases):
    np.testing.assert_array_equal(canvas["inputs"][r, :len(c)], c)
    np.testing.assert_array_equal(canvas["segment_ids"][r, :len(c)], c_seg)
    assert (np.asarray(canvas["inputs"][r, len(c):]) == PAD).all()
  assert set(zip(*np.nonzero(np.asarray(missing)))) == set(targets)
  for (r, i), (s, weight) in targets.items():
    assert int(slot[r, i]) == s
    np.testing.assert_allclose(float(w[r, i]), weight, rtol=1e-5)
  # the cut document's edges and the one-token document are anchors: never missing
  assert not bool(missing[2, 0]) and not bool(missing[2, 5]) and not bool(missing[2, 6])


def numpy_logp(s_logits, score, canvas, distribution):
  """log p(word, slot) per document by explicit enumeration of its slots (a dict per row:
  canvas index -> (V,) log probabilities)."""
  seg = np.asarray(canvas["segment_ids"])
  v = s_logits.shape[-1]
  ok = (np.arange(v) >= tokenizers.NUM_SPECIAL) | (np.arange(v) == EOS)
  out = {}
  for r in range(seg.shape[0]):
    for d in set(seg[r]) - {0}:
      slot_ids = [t for t in range(seg.shape[1] - 1) if seg[r, t] == d and seg[r, t + 1] == d]
      if not slot_ids:
        continue
      z = np.where(ok, s_logits[r, slot_ids].astype(np.float64), -np.inf)
      if distribution == "joint":
        lp = z - np.log(np.exp(z).sum())
      else:
        sc = score[r, slot_ids].astype(np.float64)
        lp = (sc - np.log(np.exp(sc).sum()))[:, None] + z - np.log(np.exp(z).sum(1))[:, None]
      for k, t in enumerate(slot_ids):
        out[(r, t)] = lp[k]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("distribution", ["joint", "factorized"])
@pytest.mark.parametrize("fpe", [True, False])
def test_slot_loss_and_bound_terms_match_numpy(make_config, distribution, fpe):
  # the formulas read the network's outputs, whatever the encoder: here bidirectional, whose
  # outputs need no history (the placement encoder's histories: tests/test_insertion_cache.py)
  obj, net = make(make_config, distribution=distribution, fpe=fpe, tau=0.7,
                  encoder="bidirectional")
  t = 16
  batch = with_cut_row(packed_batch(DOCS, t), t)
  keep = np.random.default_rng(1).random(batch["inputs"].shape) < 0.5
  canvas, missing, slot, _, _ = ins.canvas_of(batch, jnp.asarray(keep))
  u = ins.fpe_vectors(net, canvas["segment_ids"]) if fpe else None
  _, logits, score = net(canvas["inputs"], canvas["segment_ids"], u)
  lp = numpy_logp(np.asarray(logits), np.asarray(score), canvas, distribution)
  _, targets = reference(batch, keep, "tree", 0.7)
  # Stern et al.'s loss: per document the mean over its slots of the slot losses
  per_slot = {k: 0.0 for k in lp}
  for (r, i), (s, w) in targets.items():
    per_slot[(r, s)] -= w * lp[(r, s)][int(batch["inputs"][r, i])]
  filled = {(r, s) for (r, _), (s, _) in targets.items()}
  docs = {}
  seg_c = np.asarray(canvas["segment_ids"])
  for (r, s), v in per_slot.items():
    v = v if (r, s) in filled else -lp[(r, s)][EOS]
    docs.setdefault((r, seg_c[r, s]), []).append(v)
  want = sum(np.mean(v) for v in docs.values())
  total, n_docs = ins.slot_loss(net, batch, jnp.asarray(keep), distribution, "tree", 0.7)
  assert int(n_docs) == len(docs) == 4  # the one-token document has no slot
  np.testing.assert_allclose(float(total), want, rtol=2e-5)
  # bound terms: mean -log p over the missing words, or -log p(stop) with nothing missing
  x = np.asarray(batch["inputs"])
  n = np.asarray(ins.words(batch)).sum()
  term, first = ins.canvas_terms(net, batch, jnp.asarray(keep), jnp.zeros_like(batch["inputs"]),
                                 jnp.full_like(batch["inputs"], n), distribution)
  got = {(r, int(batch["segment_ids"][r, i])): float(term[r, i])
         for r, i in zip(*np.nonzero(np.asarray(first)))}
  for (r, d), v in got.items():
    lps = [lp[(r, targets[(r, i)][0])][x[r, i]] for (rr, i) in targets
           if rr == r and batch["segment_ids"][r, i] == d]
    np.testing.assert_allclose(v, -np.sum(lps) / n, rtol=2e-5, atol=1e-6)
  full = jnp.asarray(np.asarray(ins.words(batch)))
  term, first = ins.canvas_terms(net, batch, full, jnp.ones_like(batch["inputs"]),
                                 jnp.ones_like(batch["inputs"]), distribution)
  canvas, *_ = ins.canvas_of(batch, full)
  u = ins.fpe_vectors(net, canvas["segment_ids"]) if fpe else None
  _, logits, score = net(canvas["inputs"], canvas["segment_ids"], u)
  lp = numpy_logp(np.asarray(logits), np.asarray(score), canvas, distribution)
  for r, i in zip(*np.nonzero(np.asarray(first))):
    d = int(batch["segment_ids"][r, i])
    eos = [v[EOS] for (rr, s), v in lp.items()
           if rr == r and int(canvas["segment_ids"][r, s]) == d]
    want = -np.log(np.sum(np.exp(eos))) if eos else 0.0
    np.testing.assert_allclose(float(term[r, i]), want, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["tree", "uniform"])
def test_sequence_finalization_targets_the_next_action(make_config, order, monkeypatch):
  """finalization=sequence: per document the cross-entropy of the next action, each slot
  weighted by its share of the missing words and split by the span weights; stop only on a
  full canvas; documents weighted by n + 1 less log n!, per word (the one-pass bound)."""
  obj, net = make(make_config, order=order, tau=0.7, finalization="sequence",
                  encoder="bidirectional")
  t = 16
  batch = with_cut_row(packed_batch(DOCS, t), t)
  x, seg = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
  keep = np.random.default_rng(2).random(x.shape) < 0.5
  keep[0, 8:11] = True  # row 0's second document keeps every word: its target is stop
  word = np.asarray(ins.words(batch))
  doc_of = lambda r, i: (r, seg[r, i])
  n_doc, k_doc = {}, {}
  for r, i in zip(*np.nonzero(seg)):
    n_doc[doc_of(r, i)] = n_doc.get(doc_of(r, i), 0) + int(word[r, i])
    k_doc[doc_of(r, i)] = k_doc.get(doc_of(r, i), 0) + int(word[r, i] and keep[r, i])
  per_tok = lambda m: jnp.asarray(np.vectorize(lambda r, i: m.get(doc_of(r, i), 0))(
      *np.indices(x.shape)), jnp.int32)
  n, k = per_tok(n_doc), per_tok(k_doc)
  canvas, *_ = ins.canvas_of(batch, jnp.asarray(keep))
  _, logits, score = net(canvas["inputs"], canvas["segment_ids"],
                         ins.fpe_vectors(net, canvas["segment_ids"]))
  lp = numpy_logp(np.asarray(logits), np.asarray(score), canvas, "joint")
  _, targets = reference(batch, keep, order, 0.7)
  span = {}  # missing words per (row, slot)
  for (r, _), (s, _) in targets.items():
    span[(r, s)] = span.get((r, s), 0) + 1
  c_seg = np.asarray(canvas["segment_ids"])
  total = weight = 0.0
  for (r, d), n_d in n_doc.items():
    missing = [(i, s, w) for (rr, i), (s, w) in targets.items() if doc_of(rr, i) == (r, d)]
    if missing:
      term = -sum(span[(r, s)] / len(missing) * w * lp[(r, s)][x[r, i]] for i, s, w in missing)
    else:
      eos = [v[EOS] for (rr, s), v in lp.items() if rr == r and c_seg[r, s] == d]
      term = -np.log(np.sum(np.exp(eos))) if eos else 0.0
    total += (n_d + 1) * term - math.lgamma(n_d + 1)
    weight += n_d
  assert k_doc[(0, 2)] == n_doc[(0, 2)] == 3
  monkeypatch.setattr(ins, "draw_keep", lambda rng, b: (jnp.asarray(keep), n, k))
  got, got_w, docs = ins.sequence_loss(net, batch, jax.random.key(0), "joint", order, 0.7)
  np.testing.assert_allclose(float(got), total, rtol=2e-5)
  assert float(got_w) == weight and int(docs) == len(n_doc) == 5
  loss, metrics = obj.loss(net, batch, jax.random.key(0))
  np.testing.assert_allclose(float(loss), total / weight, rtol=2e-5)
  assert int(metrics["documents"]) == 5
  # a model trained without end-of-slot per slot is refused parallel decoding
  with pytest.raises(ValueError, match="sequential"):
    obj.generate(net, jnp.asarray([[BOS, 40]]), jax.random.key(0), max_new_tokens=4,
                 decoding="parallel")


@pytest.mark.slow
def test_slot_finalization_has_no_pull_towards_filled_slots(make_config, monkeypatch):
  """Factorised, every slot scored alike (u = 0): the slot loss's gradient on the slot scorer
  vanishes (every slot has a target, so p(slot) uniform is its optimum, and where the words go
  is never learnt), while sequence finalization's pulls towards the slots with missing words."""
  _, net = make(make_config, distribution="factorized")
  net.slot_u[...] = jnp.zeros_like(net.slot_u[...])
  batch = with_cut_row(packed_batch(DOCS, 16), 16)
  keep = jnp.asarray(np.random.default_rng(3).random(batch["inputs"].shape) < 0.5)
  n = ins.draw_keep(jax.random.key(0), batch)[1]  # words per document (any draw)
  k_kept = blm.per_segment((keep & ins.words(batch)).astype(jnp.int32),
                           blm.segment_key(batch["segment_ids"]))
  monkeypatch.setattr(ins, "draw_keep", lambda rng, b: (keep, n, k_kept))
  grad_u = lambda f: np.asarray(nnx.grad(f)(net)["slot_u"][...])
  g_slot = grad_u(lambda m: ins.slot_loss(m, batch, keep, "factorized", "tree", 1.0)[0])
  g_seq = grad_u(lambda m: ins.sequence_loss(m, batch, jax.random.key(0), "factorized",
                                             "tree", 1.0)[0])
  assert np.abs(g_seq).max() > 1e-4
  assert np.abs(g_slot).max() < 1e-4 * np.abs(g_seq).max(), (np.abs(g_slot).max(),
                                                              np.abs(g_seq).max())


@pytest.mark.slow
def test_fpe_places_the_ends_then_the_middles_recursively(make_config):
  _, net = make(make_config)
  seg = np.zeros((2, 12), np.int32)
  seg[0, :1], seg[0, 1:3], seg[0, 3:8], seg[0, 8:12] = 1, 2, 3, 4
  seg[1, :9] = 1
  u = np.asarray(ins.fpe_vectors(net, jnp.asarray(seg)))
  begin, end = np.asarray(net.ends())
  between = lambda a, b: np.asarray(net.between(jnp.asarray(a), jnp.asarray(b)))
  for r in range(2):
    for d in set(seg[r]) - {0}:
      idx = np.nonzero(seg[r] == d)[0]
      want = {idx[-1]: end, idx[0]: begin}

      def place(lo, hi):
        if hi - lo < 2:
          return
        mid = (lo + hi) // 2
        want[idx[mid]] = between(want[idx[lo]], want[idx[hi]])
        place(lo, mid)
        place(mid, hi)
      place(0, len(idx) - 1)
      for i, v in want.items():
        np.testing.assert_allclose(u[r, i], v, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_insert_keeps_order_and_positions_and_places_new_tokens_between(make_config):
  _, net = make(make_config)
  canvas = jnp.asarray([[BOS, 40, 41, EOS, PAD, PAD, PAD]])
  u = jax.random.normal(jax.random.key(0), (1, 7, 32))
  region = jnp.asarray([[0, 0, 2, 2, 0, 0, 0]])
  after = jnp.asarray([[True, True, False, False, False, False, False]])
  new = jnp.asarray([[90, 91, 0, 0, 0, 0, 0]])
  tok, u2, reg = canvas_lib.insert(net, canvas, u, region, after, new)
  np.testing.assert_array_equal(tok[0], [BOS, 90, 40, 91, 41, EOS, PAD])
  np.testing.assert_array_equal(reg[0, :6], [0, 1, 0, 1, 2, 2])
  for old, at in ((0, 0), (1, 2), (2, 4), (3, 5)):
    np.testing.assert_array_equal(u2[0, at], u[0, old])
  np.testing.assert_allclose(u2[0, 1], net.between(u[0, 0], u[0, 1]), rtol=1e-6)
  np.testing.assert_allclose(u2[0, 3], net.between(u[0, 1], u[0, 2]), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("distribution", ["joint", "factorized"])
def test_bound_expectation_is_the_order_averaged_bound_above_the_exact_nll(make_config,
                                                                          distribution,
                                                                          monkeypatch):
  """For one document of n = 3 words: the one-pass estimate averaged over every k and kept
  subset equals -log n! - mean over the n! orders of log p(x, order), each order scored step
  by step (its slots read off canvases built here), and the exact -log p(x), -logsumexp over
  orders (orders and action sequences correspond one to one), lies below it."""
  obj, net = make(make_config, distribution=distribution, encoder="bidirectional")
  words = [40, 41, 41]  # equal neighbours: their slots tell the orders apart
  batch = packed_batch([[words]], 8)
  n = len(words)
  pos = [1, 2, 3]  # the words' indices in the row

  def logp_of(present):
    keep = np.zeros((1, 8), bool)
    keep[0, [pos[i] for i in present]] = True
    canvas, *_ = ins.canvas_of(batch, jnp.asarray(keep))
    return np.asarray(ins.action_logprobs(net, canvas, distribution))[0]

  log_orders = []
  for order in itertools.permutations(range(n)):
    total = 0.0
    for step, i in enumerate(order):
      present = sorted(order[:step])
      slot = sum(1 for j in present if j < i)  # its left neighbour: BOS or the last word < i
      total += logp_of(present)[slot, words[i]]
    full = logp_of(list(range(n)))
    total += np.log(np.exp(full[:n + 1, EOS].astype(np.float64)).sum())
    log_orders.append(total)
  order_bound = -math.log(math.factorial(n)) - np.mean(log_orders)
  exact = -np.logaddexp.reduce(log_orders)
  # the one-pass estimate's expectation: k uniform in 0..n, then a uniform subset of size k
  expect = 0.0
  for k in range(n + 1):
    subsets = list(itertools.combinations(range(n), k))
    for sub in subsets:
      keep = np.zeros((1, 8), bool)
      keep[0, [pos[i] for i in sub]] = True
      draw = (jnp.asarray(keep), jnp.full((1, 8), n), jnp.full((1, 8), k))
      monkeypatch.setattr(ins, "draw_keep", lambda rng, b, draw=draw: draw)
      nll, count = ins.bound_terms(net, batch, jax.random.key(0), distribution)
      assert int(count) == n
      expect += float(nll) / len(subsets) / (n + 1)
  np.testing.assert_allclose(expect, order_bound, rtol=1e-5)
  assert exact < order_bound
  # order_logprob scores an order as the walk above; eval_orders=m importance-samples m orders
  n_tok = jnp.full((1, 8), n)
  perms = list(itertools.permutations(range(n)))
  for order, want in zip(perms, log_orders):
    place = np.full((1, 8), -1)
    place[0, [pos[i] for i in order]] = np.arange(n)
    got = ins.order_logprob(net, batch, jnp.asarray(place), n_tok, distribution)
    np.testing.assert_allclose(float(got[0, 2]), want, rtol=1e-5)
  obj_is, _ = make(make_config, distribution=distribution, eval_orders=2,
                   encoder="bidirectional")
  rng = jax.random.key(5)
  drawn = []
  for r in jax.random.split(rng, 2):
    place = np.asarray(blm.draw_order(r, batch, ins.words(batch))[0])[0]
    drawn.append(perms.index(tuple(int(np.nonzero(place == s)[0][0]) - 1 for s in range(n))))
  want = math.log(2) - math.log(math.factorial(n)) - np.logaddexp.reduce(
      [log_orders[i] for i in drawn])
  got = obj_is.eval_sums(net, batch, rng)
  np.testing.assert_allclose(float(got["nll"]), want, rtol=1e-5)
  assert float(got["tokens"]) == n


@pytest.mark.slow
def test_draw_keep_takes_k_uniform_in_0_to_n(make_config):
  batch = packed_batch([[[40, 41, 42]]], 8)
  ks = [int(ins.draw_keep(jax.random.key(i), batch)[2][0, 0]) for i in range(400)]
  counts = np.bincount(ks, minlength=4)
  assert counts.sum() == 400 and (counts > 60).all() and len(counts) == 4, counts  # 100 each


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["parallel", "sequential"])
def test_generate_keeps_prefix_and_suffix_and_inserts_per_step(make_config, decoding):
  obj, net = make(make_config)
  prompt = jnp.asarray([[BOS, 40, 41]] * 3)
  suffix = jnp.asarray([[50, 51]] * 3)
  b, p, s, m = 3, 3, 2, 9
  canvas = jnp.concatenate([prompt, suffix, jnp.full((b, 1), EOS), jnp.full((b, m), PAD)], 1)
  region = jnp.concatenate([jnp.zeros((b, p), jnp.int32), jnp.full((b, s + 1), 2),
                            jnp.zeros((b, m), jnp.int32)], 1)
  out, reg, info = jax.jit(lambda c, r, k: obj.fill(net, c, r, k, decoding=decoding))(
      canvas, region, jax.random.key(0))
  out, reg = np.asarray(out), np.asarray(reg)
  calls = int(info["calls"])
  for r in range(b):
    np.testing.assert_array_equal(out[r][reg[r] == 0][:p], [BOS, 40, 41])
    np.testing.assert_array_equal(out[r][(reg[r] == 2) & (out[r] != PAD)], [50, 51, EOS])
    n_mid = int((reg[r] == 1).sum())
    assert ((out[r] == PAD) == (np.arange(out.shape[1]) >= p + s + 1 + n_mid)).all()
    assert (np.nonzero(reg[r] == 1)[0] > p - 1).all()  # between the prompt and the suffix
    assert (np.nonzero(reg[r] == 1)[0] < p + n_mid).all()
    if decoding == "sequential":
      assert n_mid <= calls
    else:
      assert n_mid <= 2 ** calls - 1  # one insertion per open slot per step
  gen = obj.generate(net, prompt, jax.random.key(0), max_new_tokens=m, suffix_BxS=suffix,
                     decoding=decoding)
  np.testing.assert_array_equal(np.asarray(gen)[:, :p], np.asarray(prompt))


@pytest.mark.slow
@pytest.mark.parametrize("finalization", ["slot", "sequence"])
def test_loss_gradient_is_finite_and_padding_changes_nothing(make_config, finalization,
                                                             monkeypatch):
  obj, net = make(make_config, finalization=finalization)
  narrow, wide = packed_batch(DOCS, 16), packed_batch(DOCS, 24)
  rng = jax.random.key(3)
  keep, n, k = ins.draw_keep(rng, narrow)
  place = ins.keep_order(rng, narrow)
  pad = lambda x: jnp.concatenate([x, jnp.zeros((2, 8), x.dtype)], axis=1)
  draws = {16: (keep, n, k), 24: (pad(keep), pad(n), pad(k))}  # the same canvases
  orders = {16: place, 24: pad(place)}  # and histories
  monkeypatch.setattr(ins, "draw_keep", lambda r, b: draws[b["inputs"].shape[1]])
  monkeypatch.setattr(ins, "keep_order", lambda r, b: orders[b["inputs"].shape[1]])
  loss = nnx.jit(lambda m, b: obj.loss(m, b, rng)[0])
  np.testing.assert_allclose(loss(net, narrow), loss(net, wide), rtol=1e-5)
  grads = nnx.jit(nnx.grad(lambda m: obj.loss(m, narrow, rng)[0]))(net)
  leaves = jax.tree.leaves(nnx.state(grads))
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize("bad", [{"order": "random"}, {"tau": 0.0}, {"distribution": "x"},
                                 {"decoding": "beam"}, {"finalization": "x"},
                                 {"finalization": "sequence", "decoding": "parallel"},
                                 {"eval_orders": -1}])
def test_bad_options_are_refused(make_config, bad):
  cfg = make_config({"objective.name": "insertion",
                     **{f"objective.{k}": v for k, v in bad.items()}})
  with pytest.raises((ValueError, config_lib.ConfigError), match=f"objective.{next(iter(bad))}"):
    config_lib.validate(cfg)


# ---- decoding rules against exact references ----
def _action_logp(seed=0, t=4, v=10):
  """Joint log-probabilities over (slot, word) of one row: slot 1's best is end-of-slot, slot 3
  is not open."""
  z = np.random.default_rng(seed).normal(size=(1, t, v)) * 1.5
  z[0, 1, tokenizers.EOS] = z[0, 1].max() + 1.0
  z[0, [0, 2], tokenizers.EOS] = z[0, [0, 2]].min() - 1.0
  logp = z - np.log(np.exp(z).sum())
  open_ = np.array([[True, True, True, False]])
  return jnp.asarray(logp, jnp.float32), jnp.asarray(open_), logp, open_


def _frequencies(fn, n, t, v):
  keys = jax.random.split(jax.random.key(0), n)
  got, w = jax.jit(jax.vmap(fn))(keys)
  got, w = np.asarray(got)[:, 0], np.asarray(w)[:, 0]
  counts = np.zeros((t + 1, v))
  for r in range(n):
    at = np.flatnonzero(got[r])
    if len(at):
      counts[at[0], w[r, at[0]]] += 1
    else:
      counts[t, 0] += 1   # no insertion
  return counts / n


@pytest.mark.slow
@pytest.mark.parametrize("slot_final", [True, False])
def test_sequential_action_follows_its_rule_exactly(slot_final):
  logp_j, open_j, logp, open_ = _action_logp()
  t, v = logp.shape[1:]
  room = jnp.asarray([5])
  allowed = np.zeros((t, v), bool)
  if slot_final:   # Stern et al.: slots whose best is end-of-slot are finished; words only
    live = open_[0] & (logp[0].argmax(-1) != tokenizers.EOS)
    allowed[live] = True
    allowed[:, tokenizers.EOS] = False
  else:            # the joint over open slots, end-of-slot meaning stop
    allowed[open_[0]] = True

  def exact(temperature):
    p = np.where(allowed, np.exp(logp[0] / temperature), 0.0)
    want = np.zeros((t + 1, v))
    want[:t] = p / p.sum()
    want[t, 0] = want[:t, tokenizers.EOS].sum()   # drawing EOS: no insertion
    want[:t, tokenizers.EOS] = 0.0
    return want

  # greedy: the single best allowed action
  got, w = dec.sequential_action(jax.random.key(0), logp_j, open_j, room, slot_final,
                                       temperature=0.0)
  best = np.unravel_index(np.argmax(np.where(allowed, logp[0], -np.inf)), (t, v))
  if slot_final:   # slot 1 is finished, so the best word of slots 0 and 2 goes in
    assert np.flatnonzero(np.asarray(got)[0]).tolist() == [best[0]]
    assert int(np.asarray(w)[0, best[0]]) == best[1]
  else:            # slot 1's end-of-slot is the best action: stop
    assert best[1] == tokenizers.EOS and not np.asarray(got).any()
  # sampled, at two temperatures: the exact distribution (total variation over 20000 draws)
  for temperature in (1.0, 0.5):
    want = exact(temperature)
    freq = _frequencies(lambda k: dec.sequential_action(
        k, logp_j, open_j, room, slot_final, temperature=temperature), 20000, t, v)
    assert 0.5 * np.abs(freq - want).sum() < 0.03, (temperature, freq.round(3), want.round(3))
    assert (freq[want == 0] == 0).all()


@pytest.mark.slow
def test_sequential_slot_finalized_decoding_stops_when_every_slot_is_finished():
  logp_j, open_j, logp, open_ = _action_logp()
  z = np.asarray(logp_j).copy()
  z[0, :, tokenizers.EOS] = z[0].max() + 1.0   # every slot's best is end-of-slot
  got, _ = dec.sequential_action(jax.random.key(0), jnp.asarray(z), open_j,
                                       jnp.asarray([5]), True, temperature=1.0)
  assert not np.asarray(got).any()
  # a slot that is not open never receives a word, even if its words are likeliest
  z = np.asarray(logp_j).copy()
  z[0, 3, 9] = 50.0
  for s in range(20):
    got, _ = dec.sequential_action(jax.random.key(s), jnp.asarray(z), open_j,
                                         jnp.asarray([5]), True, temperature=1.0)
    assert not np.asarray(got)[0, 3]


@pytest.mark.slow
def test_parallel_action_draws_each_open_slot_from_its_own_distribution():
  logp_j, open_j, logp, open_ = _action_logp(seed=1)
  t, v = logp.shape[1:]
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  got, w = jax.jit(jax.vmap(lambda k: dec.parallel_action(
      k, logp_j, open_j, jnp.asarray([5]), temperature=1.0)))(keys)
  got, w = np.asarray(got)[:, 0], np.asarray(w)[:, 0]
  for s in range(t):
    cond = np.exp(logp[0, s] - np.log(np.exp(logp[0, s]).sum()))
    if not open_[0, s]:
      assert not got[:, s].any()
      continue
    freq = np.bincount(w[:, s], minlength=v) / n
    assert 0.5 * np.abs(freq - cond).sum() < 0.03, (s, freq.round(3), cond.round(3))
    np.testing.assert_array_equal(got[:, s], w[:, s] != tokenizers.EOS)
  # room for one insertion: only the leftmost drawn word goes in
  ins1, w1 = dec.parallel_action(jax.random.key(2), logp_j, open_j, jnp.asarray([1]),
                                       temperature=0.0)
  words = open_[0] & (logp[0].argmax(-1) != tokenizers.EOS)
  assert np.flatnonzero(np.asarray(ins1)[0]).tolist() == [np.flatnonzero(words)[0]]


# ---- the bidirectional encoder's decoding loop against an exact enumeration ----
WORDS = (70, 71, EOS)   # the only actions the patched network gives any mass
SCALE = 100.0  # the initialised logits are about 0.02 apart
EOS_LIFT = 0.9  # so that some canvases end every slot before the row is full


def restrict_words(monkeypatch, net, v):
  """The network's word logits, scaled by SCALE, end-of-slot lifted by EOS_LIFT and kept on
  WORDS only: every decoding outcome can be enumerated, and each still depends on the whole
  canvas."""
  cls, logits = type(net.backbone), type(net.backbone).logits
  keep = jnp.zeros((v,), bool).at[jnp.asarray(WORDS)].set(True)
  lift = jnp.zeros((v,)).at[EOS].set(EOS_LIFT)
  monkeypatch.setattr(cls, "logits", lambda self, h: jnp.where(
      keep, SCALE * logits(self, h).astype(jnp.float32) + lift, -1e9))


def exact_fill(obj, net, tokens, regions, t, decoding, slot_final, temperature):
  """{final canvas: probability} and {final canvas: most network calls on a way to it} of
  one row, by walking every action the loop's rule allows: open slots lie between a token of
  region <= 1 and the next of region >= 1; `parallel` draws every open slot's word or
  end-of-slot independently and inserts the leftmost words that fit; `sequential` draws one
  (slot, word) from the joint (slot finalization: among the slots whose best is not
  end-of-slot, words only); a step inserting nothing, or filling the row, ends it. A new
  token's FPE vector is `between` its old neighbours'."""
  logp_fn = jax.jit(lambda tok, u, open_: ins.action_logprobs(
      net, {"inputs": tok, "segment_ids": (tok != PAD).astype(jnp.int32)},
      obj.opts.distribution, u, open_))
  probs, calls = {}, {}

  def end(tok, p, steps):
    key = tuple(tok) + (PAD,) * (t - len(tok))
    probs[key] = probs.get(key, 0.0) + p
    calls[key] = max(calls.get(key, 0), steps)

  def walk(tok, reg, u, p, steps):
    n = len(tok)
    if n == t:  # a full row: the loop stops without another call
      end(tok, p, steps)
      return
    pad = lambda x: np.asarray(list(x) + [PAD] * (t - n))[None]
    opened = [i for i in range(n - 1) if reg[i] <= 1 and reg[i + 1] >= 1]
    open_ = np.zeros((1, t), bool)
    open_[0, opened] = True
    u_in = None if u is None else jnp.asarray(np.concatenate(
        [u, np.zeros((t - n, u.shape[1]), u.dtype)])[None])
    z = np.asarray(logp_fn(jnp.asarray(pad(tok), jnp.int32), u_in, jnp.asarray(open_)))[0]
    z = np.where(np.isin(np.arange(z.shape[1]), WORDS), z, -np.inf) / temperature
    room = t - n
    if decoding == "parallel":
      dists = []
      for s in opened:
        q = np.exp(z[s] - np.logaddexp.reduce(z[s]))
        dists.append([(w, q[w]) for w in WORDS])
      actions = []
      for combo in itertools.product(*dists):
        words = [(s, w) for s, (w, _) in zip(opened, combo) if w != EOS][:room]
        actions.append((words, np.prod([q for _, q in combo])))
    else:
      live = opened
      if slot_final:
        live = [s for s in opened if z[s].argmax() != EOS]
      allowed = [(s, w) for s in live for w in WORDS if not (slot_final and w == EOS)]
      norm = np.logaddexp.reduce([z[s, w] for s, w in allowed]) if allowed else 0.0
      actions = [([(s, w)] if w != EOS and room > 0 else [], np.exp(z[s, w] - norm))
                 for s, w in allowed] or [([], 1.0)]
    for words, q in actions:
      if not words:
        end(tok, p * q, steps + 1)
        continue
      new_tok, new_reg, new_u = [], [], []
      after = dict(words)
      for i in range(n):
        new_tok.append(tok[i]), new_reg.append(reg[i])
        if u is not None:
          new_u.append(u[i])
        if i in after:
          new_tok.append(after[i]), new_reg.append(1)
          if u is not None:
            new_u.append(np.asarray(net.between(jnp.asarray(u[i]), jnp.asarray(u[i + 1]))))
      walk(new_tok, new_reg, None if u is None else np.stack(new_u), p * q, steps + 1)

  tok0 = [BOS, 40, EOS]
  u0 = None
  if net.fpe:
    u0 = np.asarray(canvas_lib.fpe_vectors(net, jnp.asarray([[1] * len(tok0) + [0] * (t - 3)])))
    u0 = u0[0, :len(tok0)]
  walk(tok0, [0, 0, 2], u0, 1.0, 0)
  return probs, calls


@pytest.mark.slow
@pytest.mark.parametrize("fpe,finalization,decoding", [
    (True, "slot", "parallel"), (True, "slot", "sequential"), (True, "sequence", "sequential"),
    (False, "sequence", "sequential")])
def test_bidirectional_fill_matches_its_exact_enumeration(make_config, monkeypatch, fpe,
                                                          finalization, decoding):
  """The distribution of the decoded canvases over 12000 rows against the exact one, at a
  temperature that is not 1, and the network calls the loop makes against the longest way."""
  obj, net = make(make_config, encoder="bidirectional", fpe=fpe, finalization=finalization,
                  decoding=decoding)
  restrict_words(monkeypatch, net, obj.vocab_size)
  t, n, temperature = 6, 12000, 0.6
  want, calls = exact_fill(obj, net, [BOS, 40, EOS], [0, 0, 2], t, decoding,
                           finalization == "slot", temperature)
  hot, _ = exact_fill(obj, net, [BOS, 40, EOS], [0, 0, 2], t, decoding,
                      finalization == "slot", 1.0)
  canvas = jnp.tile(jnp.asarray([[BOS, 40, EOS] + [PAD] * (t - 3)]), (n, 1))
  region = jnp.tile(jnp.asarray([[0, 0, 2] + [0] * (t - 3)]), (n, 1))
  out, reg, info = jax.jit(lambda r: obj.fill(net, canvas, region, r, temperature=temperature,
                                              decoding=decoding))(jax.random.key(0))
  out, reg = np.asarray(out), np.asarray(reg)
  got = {}
  for row in map(tuple, out):
    got[row] = got.get(row, 0) + 1 / n
  tv = lambda a, b: 0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b))
  assert set(got) <= set(want), set(got) - set(want)
  assert tv(got, want) < 0.035, tv(got, want)
  assert tv(want, hot) > 0.1   # the test tells the temperature apart
  assert len(want) >= 8        # and sees several ways
  np.testing.assert_array_equal(reg, np.where(out == PAD, 0, np.where(
      np.arange(t) < 2, 0, np.where(out == EOS, 2, 1))))
  assert int(info["calls"]) == max(calls[k] for k in got)
