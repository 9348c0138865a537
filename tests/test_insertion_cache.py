"""`insertion` under placement attention: histories against their definition, a placed
token's state fixed, the one-pass likelihood of a history against a walk that re-encodes every
canvas of it, the samplers' own trajectory probabilities against that likelihood, and cached
decoding against re-encoding, token for token."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import packed_batch
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import insertion as ins
from mdlm_jax.objectives import insertion_canvas as canvas_lib
from mdlm_jax.objectives import insertion_history as hist

BOS, EOS, PAD = tokenizers.BOS, tokenizers.EOS, tokenizers.PAD


def make(make_config, **opts):
  cfg = make_config({"objective.name": "insertion",
                     **{f"objective.{k}": v for k, v in opts.items()}})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(0))


def tree_levels(lo, hi, level=1, out=None):
  """Python reference: level of each index strictly between lo and hi in the balanced tree
  (middle (lo + hi) // 2 first)."""
  out = {} if out is None else out
  if hi - lo >= 2:
    mid = (lo + hi) // 2
    out[mid] = level
    tree_levels(lo, mid, level + 1, out)
    tree_levels(mid, hi, level + 1, out)
  return out


def test_history_steps_place_the_anchors_then_the_words():
  t = 16
  seg = np.zeros((2, t), np.int32)
  seg[0, :9], seg[0, 9:13] = 1, 2
  seg[1, :12] = 1
  anchor = np.zeros((2, t), bool)
  anchor[0, [0, 8, 9, 12]] = True                 # two documents, ends only
  anchor[1, [0, 1, 2, 3, 4, 11]] = True           # a prompt of 5 tokens, then EOS
  base = hist.word_base(t)
  got = np.asarray(hist.history_steps(jnp.asarray(seg), jnp.asarray(anchor)))
  order = np.full((2, t), -1)
  order[0, 1:8] = [3, 0, 6, 1, 5, 2, 4]
  order[0, 10:12] = [1, 0]
  order[1, 5:11] = [5, 4, 3, 2, 1, 0]
  got_order = np.asarray(hist.history_steps(jnp.asarray(seg), jnp.asarray(anchor),
                                            jnp.asarray(order)))
  for r in range(2):
    for d in set(seg[r]) - {0}:
      idx = np.flatnonzero(seg[r] == d)
      a = [i for i in idx if anchor[r, i]]
      want = {a[0]: 0, a[-1]: 0}
      want.update({a[j]: lv for j, lv in tree_levels(0, len(a) - 1).items()})
      for lo, hi in zip(a[:-1], a[1:]):
        for i, lv in tree_levels(lo, hi).items():
          want[i] = base + lv - 1
      for i in idx:
        assert got[r, i] == want[i], (r, i)
        assert got_order[r, i] == (want[i] if anchor[r, i] else base + order[r, i])
  assert (got[seg == 0] == 0).all()


def test_vectors_follow_each_tokens_neighbours_when_it_was_placed(make_config):
  _, net = make(make_config)
  t = 10
  seg = np.zeros((1, t), np.int32)
  seg[0, :9] = 1
  steps = np.array([[0, 7, 5, 9, 6, 8, 3, 6, 0, 0]])
  u = np.asarray(hist.history_vectors(net, jnp.asarray(seg), jnp.asarray(steps)))
  begin, end = np.asarray(net.ends())
  want = {0: begin, 8: end}
  between = lambda a, b: np.asarray(net.between(jnp.asarray(a), jnp.asarray(b)))
  for i in sorted(range(1, 8), key=lambda i: steps[0, i]):
    left = max(j for j in range(0, i) if steps[0, j] < steps[0, i])
    right = min(j for j in range(i + 1, 9) if steps[0, j] < steps[0, i])
    want[i] = between(want[left], want[right])
  for i, v in want.items():
    np.testing.assert_allclose(u[0, i], v, rtol=1e-5, atol=1e-5)


def test_a_placed_tokens_state_never_changes(make_config):
  """Under placement attention a token's state on the whole canvas equals its state on the
  canvas as it was when the token was placed (later tokens never reach it)."""
  _, net = make(make_config)
  x = jnp.asarray([[BOS, 40, 41, 42, 43, 44, 45, EOS]])
  seg = jnp.ones_like(x)
  steps = jnp.asarray([[0, 9, 8, 10, 7, 8, 9, 0]])
  u = hist.history_vectors(net, seg, steps)
  h = np.asarray(net.states(x, seg, u, steps))
  for s in (7, 8, 9):
    keep = np.asarray(steps[0] <= s)
    sub = lambda a: a[:, keep]
    h_s = np.asarray(net.states(sub(x), sub(seg), u[:, keep], sub(steps)))
    np.testing.assert_allclose(h_s[0], h[0, keep], rtol=2e-5, atol=2e-5)
  _, bi = make(make_config, encoder="bidirectional")
  full = np.asarray(bi.states(x, seg, u))
  keep = np.asarray(steps[0] <= 8)
  part = np.asarray(bi.states(x[:, keep], seg[:, keep], u[:, keep]))
  assert np.abs(part[0] - full[0, keep]).max() > 1e-3  # bidirectional states do change


def walk_logprob(net, x_row, steps_row, parallel, distribution, width, prompt=None):
  """Reference: log p(x, history) of one document (from a row of `width`) by re-encoding
  every canvas of the history with its own steps and vectors (action_logprobs), choosing
  each step's actions here."""
  n = len(x_row)
  base = hist.word_base(width)
  word_steps = sorted({s for s in steps_row if s >= base})
  total = 0.0
  last = max(word_steps) if word_steps else base - 1
  for s in range(base, last + 2):
    present = [i for i in range(n) if steps_row[i] < s]
    canvas = {"inputs": jnp.asarray([[x_row[i] for i in present]]),
              "segment_ids": jnp.ones((1, len(present)), jnp.int32),
              "steps": jnp.asarray([[steps_row[i] for i in present]])}
    closed = np.zeros((1, len(present)), bool)
    if prompt is not None:
      closed[0, :-1] = [prompt[a] and prompt[b] for a, b in zip(present[:-1], present[1:])]
    u = hist.history_vectors(net, canvas["segment_ids"], canvas["steps"])
    lp = np.asarray(ins.action_logprobs(net, canvas, distribution, u,
                                        allowed_BxT=jnp.asarray(~closed)), np.float64)[0]
    new = [i for i in range(n) if steps_row[i] == s]
    slot_of = {max(j for j, p in enumerate(present) if p < i): i for i in new}
    if parallel:
      for j in range(len(present) - 1):
        if closed[0, j]:
          continue
        cond = lp[j] - np.logaddexp.reduce(lp[j])
        total += cond[x_row[slot_of[j]]] if j in slot_of else cond[EOS]
    elif new:
      (j, i), = slot_of.items()
      total += lp[j, x_row[i]]
    else:
      total += np.logaddexp.reduce(lp[[j for j in range(len(present) - 1)
                                       if not closed[0, j]], EOS])
  return total


@pytest.mark.slow
@pytest.mark.parametrize("parallel,distribution,encoder", [
    (False, "joint", "placement"), (False, "factorized", "placement"),
    (True, "joint", "placement"), (True, "joint", "bidirectional")])
def test_one_pass_likelihood_of_a_history_is_the_walk_over_its_canvases(make_config, parallel,
                                                                        distribution, encoder):
  """Placement attention scores a history in one pass; the bidirectional encoder re-encodes
  each step's canvas (with the vectors its decoder gives); both equal the walk."""
  _, net = make(make_config, distribution=distribution, encoder=encoder)
  t = 12
  batch = packed_batch([[[40, 41, 41, 42], [50, 51]], [[60, 61, 62, 63, 64, 65, 66]]], t)
  seg = batch["segment_ids"]
  anchor = (batch["inputs"] == BOS) | (batch["inputs"] == EOS)
  if parallel:
    steps = hist.history_steps(seg, anchor)
  else:
    order = np.full((2, t), -1)
    order[0, 1:5], order[0, 7:9] = [2, 0, 3, 1], [1, 0]
    order[1, 1:8] = [6, 2, 4, 0, 5, 1, 3]
    steps = hist.history_steps(seg, anchor, jnp.asarray(order))
  got = np.asarray(hist.trajectory_logprob(net, batch, steps, parallel, distribution))
  x, seg, steps = map(np.asarray, (batch["inputs"], seg, steps))
  for r in range(2):
    for d in set(seg[r]) - {0}:
      idx = np.flatnonzero(seg[r] == d)
      want = walk_logprob(net, list(x[r, idx]), list(steps[r, idx]), parallel, distribution,
                          t)
      np.testing.assert_allclose(got[r, idx], want, rtol=2e-5)
  # with a prompt: the slots between prompt tokens are never open
  x = jnp.asarray([[BOS, 70, 71, 40, 41, EOS, PAD, PAD]])
  prompt = jnp.asarray([[1, 1, 1, 0, 0, 0, 0, 0]])
  b = {"inputs": x, "segment_ids": (x != PAD).astype(jnp.int32), "prompt_mask": prompt}
  steps = hist.history_steps(b["segment_ids"], ins.anchors(b))
  got = float(hist.trajectory_logprob(net, b, steps, parallel, distribution)[0, 0])
  want = walk_logprob(net, list(np.asarray(x[0, :6])), list(np.asarray(steps[0, :6])),
                      parallel, distribution, 8, prompt=list(np.asarray(prompt[0, :6]) > 0))
  np.testing.assert_allclose(got, want, rtol=2e-5)


def decoder(obj, net, temperature, decoding=None, n=20, rows=2):
  """The jitted fill of `rows` prompts with room for `n` words, a function of the key (one
  compilation for every key)."""
  prompt = jnp.asarray([[BOS, 70 + 2 * i, 71 + 2 * i] for i in range(rows)], jnp.int32)
  b, p = prompt.shape
  canvas = jnp.concatenate([prompt, jnp.full((b, 1), EOS), jnp.full((b, n), PAD)], 1)
  region = jnp.concatenate([jnp.zeros((b, p), jnp.int32), jnp.full((b, 1), 2),
                            jnp.zeros((b, n), jnp.int32)], 1)
  return jax.jit(lambda r: obj.fill(net, canvas, region, r, temperature=temperature,
                                    decoding=decoding))


@pytest.mark.slow
@pytest.mark.parametrize("finalization,decoding", [("slot", "parallel"),
                                                   ("sequence", "sequential")])
def test_the_samplers_step_probabilities_are_the_likelihood_of_their_trajectory(
    make_config, finalization, decoding):
  """Decoding at temperature 1 records the probability of each step's draws; their product
  is the one-pass likelihood of the decoded canvas along the history it was built in."""
  cfg = make_config({"objective.name": "insertion", "objective.finalization": finalization,
                     "objective.decoding": decoding, "model.tied_embeddings": False})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  net = obj.build(nnx.Rngs(0))
  # a random model over 260 bytes almost never ends: keep three words live (the others'
  # output vectors point against the mean slot state of a canvas) and lift end-of-slot along
  # it, so decoding ends by itself after a few words
  c = jnp.asarray([[BOS, 70, 71, 72, 73, 74, EOS]])
  u = hist.history_vectors(net, jnp.ones_like(c), hist.history_steps(jnp.ones_like(c),
                                                                     c < 100))
  s_mean = jnp.mean(net(c, jnp.ones_like(c), u, jnp.zeros_like(c))[0][0, :-1], axis=0)
  along = s_mean / jnp.sum(s_mean ** 2)
  w = net.backbone.unembed[...]
  lift = 2.5 if decoding == "parallel" else 1.0
  net.backbone.unembed[...] = (w.at[:, tokenizers.NUM_SPECIAL:].set(-20.0 * along[:, None])
                               .at[:, 70:73].set(w[:, 70:73]).at[:, EOS].set(lift * along))
  written = 0
  fill = decoder(obj, net, 1.0, n=40, rows=8)
  for seed in range(4):
    canvas, region, info = fill(jax.random.key(seed))
    real = canvas != PAD
    ended = np.asarray(jnp.sum(real, axis=1) < canvas.shape[1])  # not stopped by the room
    batch = {"inputs": canvas, "segment_ids": real.astype(jnp.int32),
             "prompt_mask": (region == 0) & real}
    lp = hist.trajectory_logprob(net, batch, info["steps"], parallel=decoding == "parallel")
    np.testing.assert_allclose(np.asarray(lp[:, 0])[ended], np.asarray(info["logp"])[ended],
                               rtol=1e-4)
    written += int(jnp.sum((region == 1)[ended]))
  assert written >= 8  # the trajectories hold words, not only end-of-slots


@pytest.mark.slow
@pytest.mark.parametrize("decoding", ["parallel", "sequential"])
def test_cached_decoding_writes_what_re_encoding_writes(make_config, decoding):
  outs = {}
  for cache in (True, False):
    obj, net = make(make_config, kv_cache=cache)
    fills = {temp: decoder(obj, net, temp, decoding) for temp in (0.0, 1.0)}
    outs[cache] = [fills[temp](jax.random.key(s)) for s in range(3) for temp in (0.0, 1.0)]
  for (c1, r1, i1), (c2, r2, i2) in zip(outs[True], outs[False]):
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(i1["steps"], i2["steps"])
    assert int(i1["calls"]) == int(i2["calls"])
  assert any(int(jnp.sum(c != PAD)) > 12 for c, _, _ in outs[True])  # something was written


@pytest.mark.slow
@pytest.mark.parametrize("distribution", ["joint", "factorized"])
def test_one_pass_bound_averages_to_the_order_bound(make_config, distribution, monkeypatch):
  """Sequence finalization under placement attention: the one-pass estimate, averaged over
  every k and every order of the kept words (the history the estimate gives the canvas), is
  -log n! - the mean over orders of log p(x, order), each scored by the walk."""
  obj, net = make(make_config, distribution=distribution, finalization="sequence")
  words = [40, 41, 41]
  batch = packed_batch([[words]], 8)
  n, pos = len(words), [1, 2, 3]
  x = list(np.asarray(batch["inputs"][0, :5]))
  base = hist.word_base(8)
  log_orders, expect = [], 0.0
  for order in itertools.permutations(range(n)):
    steps = [0, 0, 0, 0, 0]
    for rank, i in enumerate(order):
      steps[pos[i]] = base + rank
    log_orders.append(walk_logprob(net, x, steps, False, distribution, 8))
    for k in range(n + 1):
      keep = np.zeros((1, 8), bool)
      keep[0, [pos[i] for i in order[:k]]] = True
      place = np.full((1, 8), -1)
      place[0, [pos[i] for i in order]] = np.arange(n)
      draw = (jnp.asarray(keep), jnp.full((1, 8), n), jnp.full((1, 8), k))
      monkeypatch.setattr(ins, "draw_keep", lambda rng, b, draw=draw: draw)
      monkeypatch.setattr(ins, "keep_order", lambda rng, b, p=place: jnp.asarray(p))
      nll, _ = ins.bound_terms(net, batch, jax.random.key(0), distribution)
      expect += float(nll) / math.factorial(n) / (n + 1)
  order_bound = -math.log(math.factorial(n)) - np.mean(log_orders)
  np.testing.assert_allclose(expect, order_bound, rtol=1e-5)
  assert -np.logaddexp.reduce(log_orders) < order_bound


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["placement", "bidirectional"])
@pytest.mark.parametrize("decoding", ["parallel", "sequential"])
def test_decoders_pass_every_filter_and_stop_when_nothing_is_inserted(make_config, monkeypatch,
                                                                      encoder, decoding):
  """Every draw gets the user's temperature and filters; a model that ends every slot at once
  makes one call; one that never ends a slot stops when the row is full, without another
  call (parallel: open slots 1, 2, 4, then the one place left; sequential: one per place)."""
  obj, net = make(make_config, encoder=encoder)
  from mdlm_jax.objectives import insertion_decoding as dec
  got = []
  draw = dec.sampling.sample_logits

  def spy(key, logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    got.append((temperature, top_k, top_p, min_p))
    return draw(key, logits, temperature, top_k, top_p, min_p)
  monkeypatch.setattr(dec.sampling, "sample_logits", spy)
  canvas = jnp.asarray([[BOS, 70, EOS] + [PAD] * 8])
  region = jnp.asarray([[0, 0, 2] + [0] * 8])
  obj.fill(net, canvas, region, jax.random.key(0), temperature=0.7, top_k=5, top_p=0.8,
           min_p=0.05, decoding=decoding)
  assert got and set(got) == {(0.7, 5, 0.8, 0.05)}
  v = obj.vocab_size
  monkeypatch.setattr(type(net.backbone), "logits",
                      lambda self, h: jnp.zeros(h.shape[:-1] + (v,)).at[..., EOS].set(30.0))
  out, _, info = obj.fill(net, canvas, region, jax.random.key(0), decoding=decoding)
  np.testing.assert_array_equal(out, canvas)
  assert int(info["calls"]) == 1
  monkeypatch.setattr(type(net.backbone), "logits",
                      lambda self, h: jnp.zeros(h.shape[:-1] + (v,)).at[..., EOS].set(-30.0))
  out, _, info = obj.fill(net, canvas, region, jax.random.key(0), decoding=decoding)
  assert (np.asarray(out) != PAD).all()
  assert int(info["calls"]) == (4 if decoding == "parallel" else 8)


def test_edge_canvases_keep_the_edges_of_rows_one_document_fills():
  """bench's --insertion_start=validation: rows with a document boundary, a second segment or
  padding are passed over, and no batch past the one that completes the rows is read."""
  x = lambda *v: np.asarray(v, np.int32)
  first = {"inputs": np.stack([x(BOS, 70, 71, 72), x(70, 71, 72, 73), x(70, 71, EOS, 80),
                               x(PAD, PAD, PAD, PAD), x(74, 75, 76, 77)]),
           "segment_ids": np.stack([x(1, 1, 1, 1), x(1, 1, 2, 2), x(1, 1, 1, 1),
                                    x(0, 0, 0, 0), x(1, 1, 1, 1)])}
  second = {"inputs": np.stack([x(80, 81, 82, PAD), x(90, 91, 92, 93)]),
            "segment_ids": np.stack([x(1, 1, 1, 0), x(3, 3, 3, 3)])}

  def batches():
    yield first
    yield second
    raise AssertionError("read past the rows asked for")

  canvas, region = canvas_lib.edge_canvases(batches(), 2)
  np.testing.assert_array_equal(canvas, [[74, 77, PAD, PAD], [90, 93, PAD, PAD]])
  np.testing.assert_array_equal(region, [[0, 2, 0, 0], [0, 2, 0, 0]])
  with pytest.raises(ValueError, match="3 rows asked for, but only 2"):
    canvas_lib.edge_canvases(iter([first, second]), 3)
