"""The `blm` objective: canvases, the one-pass bound and the order likelihood against an
explicit simulation of the insertion process, the draws, and the sampler."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import packed_batch as batch_of
from mdlm_jax import config as config_lib
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import blm

BOS, EOS, BLANK, PAD = tokenizers.BOS, tokenizers.EOS, tokenizers.BLANK, tokenizers.PAD
V = tokenizers.get_tokenizer("bytes").vocab_size


def make(make_config, **opts):
  cfg = make_config({"objective.name": "blm", **{f"objective.{k}": v for k, v in opts.items()}})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(0))


DOCS = [[[40, 41, 42, 43], [50, 51, 52]], [[60, 61, 62, 63]]]


def reference_canvas(words, present):
  """[BOS] the present words, each run of missing ones as one BLANK [EOS]; and for each word
  the canvas index of its place (its blank when missing)."""
  canvas, at = [BOS], []
  for i, w in enumerate(words):
    if i in present:
      canvas.append(w)
    elif i == 0 or i - 1 in present:
      canvas.append(BLANK)
    at.append(len(canvas) - 1)
  return canvas + [EOS], at


@pytest.mark.slow
def test_canvas_collapses_each_run_of_dropped_words_per_document():
  batch = batch_of(DOCS, 16)
  rng = np.random.default_rng(0)
  for _ in range(5):
    keep = jnp.asarray(rng.random((2, 16)) < 0.5)
    canvas, c_idx, dropped, _ = blm.canvas_of(batch, keep)
    for r, row in enumerate(DOCS):
      want_x, want_seg, want_pos, i, c = [], [], [], 0, 0
      for s, words in enumerate(row, start=1):
        present = {j for j in range(len(words)) if bool(keep[r, i + 1 + j])}
        doc, at = reference_canvas(words, present)
        want_x += doc
        want_seg += [s] * len(doc)
        want_pos += list(range(len(doc)))
        for j in range(len(words)):
          assert bool(dropped[r, i + 1 + j]) == (j not in present)
          assert int(c_idx[r, i + 1 + j]) == c + at[j]
        i += len(words) + 2
        c += len(doc)
      n = len(want_x)
      np.testing.assert_array_equal(canvas["inputs"][r, :n], want_x)
      np.testing.assert_array_equal(canvas["segment_ids"][r, :n], want_seg)
      np.testing.assert_array_equal(canvas["positions"][r, :n], want_pos)
      assert (np.asarray(canvas["inputs"][r, n:]) == PAD).all()
      assert (np.asarray(canvas["segment_ids"][r, n:]) == 0).all()


def simulate(net, words, order, width=8):
  """log p(x, order) of one document by building each canvas by hand and scoring the action
  that inserts the next word of the order (numpy over the network's outputs). Canvases are
  padded to `width` (a padding segment of its own) so the network compiles once."""
  fwd = _forward(net)
  present, total = set(), 0.0
  for j in order:
    canvas, at = reference_canvas(words, present)
    n = len(canvas)
    seg = jnp.asarray([[1] * n + [0] * (width - n)])
    h, logits, score = fwd(jnp.asarray([canvas + [PAD] * (width - n)]),
                           jnp.arange(width)[None] * seg, seg)
    score, logits = np.asarray(score[0], np.float64), np.asarray(logits[0], np.float64)
    blanks = [c for c, tok in enumerate(canvas) if tok == BLANK]
    b = at[j]
    lp_blank = score[b] - np.log(np.exp(score[blanks]).sum())
    real = logits[b, tokenizers.NUM_SPECIAL:]
    lp_word = logits[b, words[j]] - np.log(np.exp(real).sum())
    left = j > 0 and j - 1 not in present
    right = j + 1 < len(words) and j + 1 not in present
    lr = np.asarray(jax.nn.log_softmax(net.lr_logits(h[0, b], jnp.asarray(words[j]))),
                    np.float64)
    total += lp_blank + lp_word + lr[2 * left + right]
    present.add(j)
  return total


_FORWARD = {}


def _forward(net):
  if id(net) not in _FORWARD:
    _FORWARD[id(net)] = jax.jit(lambda x, p, s: net(x, p, s))
  return _FORWARD[id(net)]


@pytest.mark.slow
def test_order_likelihood_equals_the_simulated_insertions(make_config):
  _, net = make(make_config)
  batch = batch_of(DOCS, 16)
  rng = np.random.default_rng(1)
  place = np.full((2, 16), -1, np.int32)
  orders = {}
  for r, row in enumerate(DOCS):
    i = 0
    for words in row:
      order = list(rng.permutation(len(words)))
      orders[(r, i)] = order
      for t, j in enumerate(order):
        place[r, i + 1 + j] = t
      i += len(words) + 2
  n = blm.draw_order(jax.random.key(0), batch)[1]
  got = blm.order_logprob(net, batch, jnp.asarray(place), n)
  for (r, i), order in orders.items():
    words = DOCS[r][[k for k in range(len(DOCS[r])) if sum(len(w) + 2 for w in DOCS[r][:k])
                     == i][0]]
    np.testing.assert_allclose(float(got[r, i]), simulate(net, words, order), rtol=2e-5)


@pytest.mark.slow
def test_one_pass_bound_is_the_order_averaged_bound(make_config):
  """E over k ~ U{0..n-1} and a uniform k-subset of n * mean(dropped CE), minus log n!, equals
  -log n! - mean over all n! orders of log p(x, order) (enumerated exactly), and the exact
  -log p(x) = -logsumexp over orders of log p(x, order) lies below it."""
  _, net = make(make_config)
  words = [40, 41, 42, 43]
  n = len(words)
  batch = batch_of([[words]], 8)
  expected = 0.0
  for k in range(n):
    for kept in itertools.combinations(range(n), k):
      keep = np.zeros((1, 8), bool)
      keep[0, [1 + j for j in kept]] = True
      logp, dropped = blm.action_logprobs(net, batch, jnp.asarray(keep))
      ce = -float(jnp.sum(logp)) / int(jnp.sum(dropped))
      expected += n * ce / (n * math.comb(n, k))
  expected -= math.lgamma(n + 1)
  joint = np.asarray([simulate(net, words, o) for o in itertools.permutations(range(n))])
  jensen = -math.lgamma(n + 1) - joint.mean()
  np.testing.assert_allclose(expected, jensen, rtol=1e-5)
  exact = -np.log(np.exp(joint).sum())
  assert exact <= jensen
  # the estimators: their means over draws land on these
  keys = jax.random.split(jax.random.key(0), 400)
  one_pass = float(jnp.mean(jax.jit(jax.vmap(lambda k: blm.bound_terms(net, batch, k)[0]))(
      keys)))
  assert abs(one_pass - jensen) < 0.02 * abs(jensen)
  importance = float(jnp.mean(jax.jit(jax.vmap(
      lambda k: blm.importance_nll(net, batch, k, 4)[0]))(keys[:20])))
  assert exact - 1e-3 <= importance <= jensen + 1e-3


@pytest.mark.slow
def test_training_draws_k_uniform_below_n_and_a_uniform_subset():
  batch = batch_of([[[40, 41, 42], [50, 51, 52, 53, 54]]], 14)
  ks = {3: [], 5: []}
  kept = np.zeros(14)
  draws = 3000
  f = jax.jit(lambda key: blm.draw_keep(key, batch))
  for s in range(draws):
    keep, n, k = f(jax.random.key(s))
    keep = np.asarray(keep[0])
    assert keep[:5].sum() == int(k[0, 0]) and keep[5:].sum() == int(k[0, 5])
    assert int(n[0, 1]) == 3 and int(n[0, 7]) == 5
    ks[3].append(int(k[0, 0]))
    ks[5].append(int(k[0, 5]))
    kept += keep
  for n, values in ks.items():
    freq = np.bincount(values, minlength=n + 1) / draws
    assert freq[n] == 0.0
    np.testing.assert_allclose(freq[:n], 1.0 / n, atol=4 * math.sqrt(1.0 / n / draws))
  # each word of a document is kept equally often: E[k] / n = (n - 1) / (2 n)
  np.testing.assert_allclose(kept[[1, 2, 3]] / draws, 1 / 3, atol=0.03)
  np.testing.assert_allclose(kept[[6, 7, 8, 9, 10]] / draws, 2 / 5, atol=0.03)
  assert kept[[0, 4, 5, 11, 12, 13]].sum() == 0  # BOS, EOS and padding are never words


@pytest.mark.slow
def test_loss_is_finite_with_gradient_and_padding_changes_nothing(make_config):
  obj, net = make(make_config)
  batch = batch_of(DOCS, 16)
  wide = batch_of(DOCS, 24)
  key = jax.random.key(3)
  graphdef, state = nnx.split(net)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda st: obj.loss(nnx.merge(graphdef, st), batch, key)[0]))(state)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  sums = jax.jit(lambda b: obj.eval_sums(net, b, key))(batch)
  assert float(sums["tokens"]) == 11 and float(sums["bytes"]) == 11
  # more padding: the same documents, the same words, the same draws give the same bound
  logp = jax.jit(lambda b: blm.action_logprobs(net, b, jnp.zeros(b["inputs"].shape, bool))[0])
  np.testing.assert_allclose(np.asarray(logp(wide))[:, :16], np.asarray(logp(batch)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fill_keeps_every_given_token_in_order_and_leaves_no_blank(make_config):
  obj, net = make(make_config)
  canvas = np.full((3, 20), PAD, np.int32)
  canvas[0, :6] = [BOS, 40, BLANK, 41, BLANK, EOS]
  canvas[1, :3] = [BOS, BLANK, EOS]
  canvas[2, :18] = [BOS, *range(40, 56), EOS]  # no blank: unchanged
  for temperature in (0.0, 1.0):
    out, info = obj.fill(net, jnp.asarray(canvas), jax.random.key(4), temperature=temperature)
    out = np.asarray(out)
    added = (out != PAD).sum(1) - (canvas != PAD).sum(1) + (canvas == BLANK).sum(1)
    assert int(info["calls"]) == added.max()  # one call per inserted token
    assert not (out == BLANK).any()
    np.testing.assert_array_equal(out[2], canvas[2])
    for r in range(2):
      given = [tok for tok in canvas[r] if tok not in (BLANK, PAD)]
      it = iter(out[r].tolist())
      assert all(tok in it for tok in given), (canvas[r], out[r])  # a subsequence, in order
      real = out[r][out[r] != PAD]
      assert len(real) == (out[r] != PAD).sum() and (out[r][len(real):] == PAD).all()
      assert real[0] == BOS and real[-1] == EOS


@pytest.mark.slow
def test_a_full_row_still_fills_its_blanks(make_config):
  obj, net = make(make_config)
  canvas = jnp.asarray([[BOS, 40, BLANK, BLANK, 41, EOS]])
  out = np.asarray(obj.fill(net, canvas, jax.random.key(5))[0])
  assert not (out == BLANK).any() and out[0, 1] == 40 and out[0, 4] == 41


@pytest.mark.slow
def test_generate_returns_prompt_middle_eos_without_the_suffix(make_config):
  obj, net = make(make_config)
  prompt = jnp.asarray([[BOS, 40, 41]] * 2)
  suffix = jnp.asarray([[50, 51]] * 2)
  out = np.asarray(obj.generate(net, prompt, jax.random.key(6), max_new_tokens=5,
                                suffix_BxS=suffix))
  assert out.shape == (2, 8)
  assert (out[:, :3] == np.asarray(prompt)).all()
  for row in out:
    middle = row[3:]
    end = np.flatnonzero(middle == EOS)
    assert len(end) <= 1 and not (middle == BLANK).any()
    assert (middle[end[0] + 1:] == PAD).all() if len(end) else True


@pytest.mark.parametrize("bad", [{"eval_orders": -1}])
def test_bad_options_are_refused(make_config, bad):
  cfg = make_config({"objective.name": "blm", **{f"objective.{k}": v for k, v in bad.items()}})
  with pytest.raises(ValueError, match="objective.eval_orders"):
    config_lib.validate(cfg)
