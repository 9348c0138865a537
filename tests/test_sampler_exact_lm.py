"""The left-to-right samplers (ar, bst towards a suffix) and the blank-filling sampler (blm)
against exact references computed from uncached network calls: their outputs over many keys
match the exact distribution of the rule (temperature, then top-k) in total variation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import bst

BOS, EOS, PAD, BLANK = tokenizers.BOS, tokenizers.EOS, tokenizers.PAD, tokenizers.BLANK
DRAWS = 12000


def make(make_config, name, **over):
  cfg = make_config({"objective.name": name, "model.init_std": 0.3, **over})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(3))


def rule(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
  """The draw's exact distribution: logits / temperature, then the top k, the smallest set
  reaching top_p (the crossing token kept) and the tokens within min_p of the best, softmax."""
  z = np.asarray(logits, np.float64) / temperature
  if top_k:
    z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  keep = np.zeros(len(p), bool)
  keep[order[(np.cumsum(p[order]) - p[order]) < top_p]] = True
  keep &= p >= min_p * p.max()
  p = np.where(keep, p, 0.0)
  return p / p.sum()


def left_to_right_reference(next_logits, prompt, steps, temperature, top_k, **filters):
  """{continuation: probability} of `steps` tokens, EOS followed by PAD."""
  dist = {(): 1.0}
  for _ in range(steps):
    new = {}
    for cont, p in dist.items():
      if cont and cont[-1] in (EOS, PAD):
        new[cont + (PAD,)] = new.get(cont + (PAD,), 0.0) + p
        continue
      q = rule(next_logits(list(prompt) + list(cont)), temperature, top_k, **filters)
      for tok in np.flatnonzero(q > 0):
        new[cont + (int(tok),)] = new.get(cont + (int(tok),), 0.0) + p * q[tok]
    dist = new
  return dist


def frequencies(rows):
  out = {}
  for r in map(tuple, np.asarray(rows).tolist()):
    out[r] = out.get(r, 0) + 1
  return {k: v / len(rows) for k, v in out.items()}


def total_variation(p, q):
  return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.parametrize("temperature,top_k,filters", [
    (1.0, 3, {}), (0.5, 4, {}), (1.0, 0, {"top_p": 0.3}), (1.5, 0, {"min_p": 0.6})])
@pytest.mark.slow
def test_ar_sampler_matches_the_uncached_model(make_config, temperature, top_k, filters):
  obj, model = make(make_config, "ar")
  prompt = [BOS, 70]

  def next_logits(prefix):
    x = jnp.asarray([prefix], jnp.int32)
    return np.asarray(model(x, jnp.arange(len(prefix))[None], jnp.ones_like(x)))[0, -1]

  ref = left_to_right_reference(next_logits, prompt, 2, temperature, top_k, **filters)
  fn = jax.jit(jax.vmap(lambda k: obj.generate(model, jnp.asarray([prompt], jnp.int32), k,
                                               max_new_tokens=2, temperature=temperature,
                                               top_k=top_k, **filters)[0, 2:]))
  emp = frequencies(fn(jax.random.split(jax.random.key(0), DRAWS)))
  assert total_variation(emp, ref) < 0.03, (sorted(emp.items()), sorted(ref.items()))


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k", [(1.0, 3), (0.4, 3)])
def test_bst_sampler_matches_the_uncached_forward_head(make_config, temperature, top_k):
  obj, net = make(make_config, "bst")
  prompt, suffix = [BOS, 70], jnp.asarray([[80, 81]], jnp.int32)
  c = net.text.first_b(net.suffix_state(suffix)[:, -1:])
  v = obj.vocab_size

  def next_logits(prefix):
    x = jnp.asarray([prefix], jnp.int32)
    f = net.forward_states(x, jnp.arange(len(prefix))[None], jnp.ones_like(x))
    return np.asarray(bst.head_logits(net.text.first_f(f[:, -1:]), c, net.text.w_out[...][:, :v],
                                      net.text.b_out[...][:v]))[0, 0]

  ref = left_to_right_reference(next_logits, prompt, 2, temperature, top_k)
  fn = jax.jit(jax.vmap(lambda k: obj.generate(net, jnp.asarray([prompt], jnp.int32), k,
                                               max_new_tokens=2, temperature=temperature,
                                               top_k=top_k, suffix_BxS=suffix)[0, 2:]))
  emp = frequencies(fn(jax.random.split(jax.random.key(1), DRAWS)))
  assert total_variation(emp, ref) < 0.03, (sorted(emp.items()), sorted(ref.items()))


def blm_reference(obj, model, canvas, temperature, top_k, **filters):
  """{final canvas: probability}: each action draws a blank (softmax of the blank scores), a
  word (temperature, top-k) and a (left, right) choice that fits the row, from uncached calls;
  the canvas is rebuilt here by list surgery."""
  t = len(canvas)
  call = jax.jit(lambda x: model(x, jnp.where(x != PAD, jnp.arange(t)[None], 0),
                                 (x != PAD).astype(jnp.int32)))
  dist, final = {tuple(canvas): 1.0}, {}
  for _ in range(t):
    new = {}
    for cv, p in dist.items():
      if BLANK not in cv:
        final[cv] = final.get(cv, 0.0) + p
        continue
      h, logits, score = call(jnp.asarray([cv], jnp.int32))
      h, logits, score = np.asarray(h[0]), np.asarray(logits[0]), np.asarray(score[0])
      blanks = [i for i, x in enumerate(cv) if x == BLANK]
      pb = rule(np.array([score[i] for i in blanks]), temperature, len(blanks))
      room = t - sum(x != PAD for x in cv)
      for bi, at in enumerate(blanks):
        wl = logits[at].copy()
        wl[:tokenizers.NUM_SPECIAL] = -np.inf
        pw = rule(wl, temperature, top_k, **filters)
        for w in np.flatnonzero(pw > 0):
          lr = np.asarray(model.lr_logits(jnp.asarray(h[at][None]), jnp.asarray([w])))[0]
          grow = np.array([0, 1, 1, 2])
          lr = np.where(grow <= room, lr, -np.inf)
          plr = rule(lr, temperature, 4)
          for c in range(4):
            if plr[c] == 0:
              continue
            left, right = c // 2, c % 2
            body = list(cv[:at]) + [BLANK] * left + [int(w)] + [BLANK] * right + list(cv[at + 1:])
            body = [x for x in body if x != PAD][:t]
            nxt = tuple(body + [PAD] * (t - len(body)))
            new[nxt] = new.get(nxt, 0.0) + p * pb[bi] * pw[w] * plr[c]
    dist = new
  for cv, p in dist.items():
    final[cv] = final.get(cv, 0.0) + p
  return final


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k,filters", [(1.0, 2, {}), (0.6, 2, {}),
                                                       (1.0, 0, {"top_p": 0.02, "min_p": 0.9})])
def test_blm_sampler_matches_its_exact_reference(make_config, temperature, top_k, filters):
  obj, model = make(make_config, "blm")
  canvas = [BOS, BLANK, EOS, PAD, PAD]
  ref = blm_reference(obj, model, canvas, temperature, top_k, **filters)
  fn = jax.jit(jax.vmap(lambda k: obj.fill(model, jnp.asarray([canvas], jnp.int32), k,
                                           temperature=temperature, top_k=top_k,
                                           **filters)[0][0]))
  emp = frequencies(fn(jax.random.split(jax.random.key(2), DRAWS)))
  assert abs(sum(ref.values()) - 1) < 1e-6
  assert total_variation(emp, ref) < 0.04, (sorted(emp.items())[:8], sorted(ref.items())[:8])


@pytest.mark.slow
def test_blm_generate_is_one_blanks_fill_with_the_suffix_dropped(make_config):
  """`generate` fills one blank between the prompt and the suffix with the same draws `fill`
  makes (every sampling option passed on), then returns the prompt, the middle and EOS; its
  defaults are temperature 1 and no filter."""
  from mdlm_jax.objectives import blm
  obj, model = make(make_config, "blm")
  prompt = jnp.asarray([[BOS, 40, 41], [BOS, 42, 43]], jnp.int32)
  suffix = jnp.asarray([[50, 51], [52, 53]], jnp.int32)
  key, n = jax.random.key(3), 4
  # (the random network's words are near-uniform: min-p 0.99 keeps only a few of them)
  for opts in ({}, {"temperature": 0.7, "top_p": 0.5}, {"temperature": 1.3, "min_p": 0.99}):
    got = np.asarray(obj.generate(model, prompt, key, max_new_tokens=n, suffix_BxS=suffix,
                                  **opts))
    canvas = np.asarray(obj.fill(model, blm.one_blank(prompt, n, suffix), key, **opts)[0])
    for r in range(2):
      c = [int(x) for x in canvas[r] if x != PAD]
      assert c[-3:] == [*np.asarray(suffix[r]), EOS] and c[:3] == list(np.asarray(prompt[r]))
      want = (c[:-3] + [EOS])[:3 + n]  # (a middle of n words leaves no room for EOS)
      np.testing.assert_array_equal(got[r], want + [PAD] * (3 + n - len(want)))
  plain = obj.generate(model, prompt, key, max_new_tokens=n)
  explicit = obj.generate(model, prompt, key, max_new_tokens=n, temperature=1.0, top_k=0,
                          top_p=1.0, min_p=0.0)
  np.testing.assert_array_equal(plain, explicit)
