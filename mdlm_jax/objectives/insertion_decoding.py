"""Decoding an insertion model: one parallel or sequential action per network call, the loop
that applies them to a canvas, and which decoding a finalization allows."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import insertion_history as history
from mdlm_jax.objectives.insertion_canvas import fpe_vectors
from mdlm_jax.objectives.insertion_canvas import insert
from mdlm_jax.objectives.insertion_canvas import slots

DECODINGS = ("parallel", "sequential")


def parallel_action(key, logp_BxTxV, open_BxT, room_B, **draw):
  """Every open slot draws from its own p(word | slot) (`sampling.draw` options); end-of-slot
  (EOS) closes it. Returns (insert after t (B, T) bool, the word (B, T)): the leftmost
  insertions that fit the row's room."""
  b, t, v = logp_BxTxV.shape
  cond = logp_BxTxV - jax.nn.logsumexp(logp_BxTxV, axis=-1, keepdims=True)
  w = sampling.sample_logits(key, cond.reshape(b * t, v), **draw).reshape(b, t)
  ins = open_BxT & (w != tokenizers.EOS)
  return ins & (jnp.cumsum(ins, axis=1) <= room_B[:, None]), w


def sequential_action(key, logp_BxTxV, open_BxT, room_B, slot_final: bool, **draw):
  """One (slot, word) action per row from the joint log-probabilities over open slots.
  Sequence finalization: end-of-slot (EOS) anywhere means stop. Slot finalization (Stern et
  al.'s greedy rule): a slot whose best action is end-of-slot is finished; the action is
  drawn among the other open slots' words (their joint renormalised; greedy at temperature
  0) and the row stops when every open slot is finished. Returns (insert after t, word)."""
  b, t, v = logp_BxTxV.shape
  logp = jnp.where(open_BxT[..., None], logp_BxTxV, sampling.NEG_INF)
  if slot_final:
    finished = jnp.argmax(logp_BxTxV, axis=-1) == tokenizers.EOS
    live = open_BxT & ~finished
    word = jnp.arange(v) != tokenizers.EOS
    logp = jnp.where(live[..., None] & word, logp, sampling.NEG_INF)
    go = jnp.any(live, axis=1)
  else:
    go = jnp.ones((b,), bool)
  a = sampling.sample_logits(key, logp.reshape(b, t * v), **draw)
  at, w = a // v, a % v
  ins = (jnp.arange(t) == at[:, None]) & ((w != tokenizers.EOS) & go & (room_B > 0))[:, None]
  return ins, jnp.broadcast_to(w[:, None], (b, t))


def resolve_decoding(decoding: str, finalization: str) -> str:
  """'auto' -> parallel after slot finalization, sequential after sequence finalization;
  refuses parallel decoding of a model that never learnt a per-slot end-of-slot."""
  if decoding == "auto":
    decoding = "parallel" if finalization == "slot" else "sequential"
  if decoding not in DECODINGS:
    raise ValueError(f"objective.decoding={decoding!r}; choose 'auto' or one of {DECODINGS}.")
  if decoding == "parallel" and finalization == "sequence":
    raise ValueError("parallel decoding reads end-of-slot per slot, which only "
                     "objective.finalization='slot' trains; with "
                     "objective.finalization='sequence' decode sequentially "
                     "(objective.decoding=sequential, --sampler=sequential).")
  return decoding


def fill(model, canvas_BxT, region_BxT, rng, logprobs_fn, decoding: str, slot_final: bool,
         **draw):
  """The decoding loop of `Insertion.fill` (see there): `logprobs_fn(canvas, u, open)` the
  action log-probabilities (B, T, V), `decoding` resolved, `draw` the `sampling.draw`
  options. Returns (canvas, region, info)."""
  b, t = canvas_BxT.shape
  seg0 = (canvas_BxT != tokenizers.PAD).astype(jnp.int32)
  u0 = (fpe_vectors(model, seg0) if model.fpe
        else jnp.zeros((b, t, 1), jnp.float32))

  def body(state):
    canvas, u, region, done, key, i = state
    key, k_draw = jax.random.split(key)
    real = canvas != tokenizers.PAD
    c = {"inputs": canvas, "segment_ids": real.astype(jnp.int32)}
    nxt_region = jnp.concatenate([region[:, 1:], jnp.zeros_like(region[:, :1])], axis=1)
    open_ = slots(c) & (region <= 1) & (nxt_region >= 1)
    logp = logprobs_fn(c, u if model.fpe else None, open_)
    room = t - jnp.sum(real, axis=1)
    if decoding == "parallel":
      ins, w = parallel_action(k_draw, logp, open_, room, **draw)
    else:
      ins, w = sequential_action(k_draw, logp, open_, room, slot_final=slot_final, **draw)
    ins = ins & ~done[:, None] & jnp.any(open_, axis=1, keepdims=True)
    canvas, u, region = insert(model, canvas, u, region, ins, w)
    full = jnp.sum(canvas != tokenizers.PAD, axis=1) >= t   # no further call can insert
    return canvas, u, region, done | ~jnp.any(ins, axis=1) | full, key, i + 1

  def cond(state):
    return ~jnp.all(state[3]) & (state[5] < t)

  init = (canvas_BxT, u0, region_BxT, jnp.zeros((b,), bool), rng, 0)
  canvas, _, region, _, _, calls = jax.lax.while_loop(cond, body, init)
  return canvas, region, {"calls": calls, "encoded": calls * t}



def _capacities(t: int) -> list[int]:
  """Query widths a cached step compiles for: 1, 2, 4, ... up to the row width."""
  out = [1]
  while out[-1] < t:
    out.append(min(2 * out[-1], t))
  return out


def fill_placed(model, canvas_BxT, region_BxT, rng, distribution: str, decoding: str,
                slot_final: bool, kv_cache: bool = True, **draw):
  """`Insertion.fill` under placement attention. The given tokens are placed first (a
  balanced tree over them); each step places its new tokens at the next step, each with its
  FPE vector `between` its neighbours then. A token's state never changes once placed, so
  `kv_cache` keeps every placed token's keys and values (a buffer in placement order; the
  canvas order is a permutation of it) and a step encodes only its new tokens, at the
  narrowest compiled width (1, 2, 4, ...) that holds them; `kv_cache=False` re-encodes every
  placed token at every step under the same mask (the same outputs, at the old cost).
  Returns (canvas, region, info): info["calls"], the steps; info["encoded"], the token
  positions the network encoded (the first pass's included); info["steps"], each canvas
  token's placement step; info["logp"], per row the log-probability of the decoding's
  trajectory under the model (that of the sampled distribution at temperature 1 without
  filters, for parallel decoding and for sequential decoding with sequence finalization)."""
  b, t = canvas_BxT.shape
  net = model.backbone
  rows = jnp.arange(b)[:, None]
  idx = jnp.arange(t, dtype=jnp.int32)
  real0 = canvas_BxT != tokenizers.PAD
  steps0 = history.history_steps(real0.astype(jnp.int32), real0)
  u0 = history.history_vectors(model, real0.astype(jnp.int32), steps0)
  base = history.word_base(t)

  def encode_all(tok, u, steps, width: int | None = None):
    """Every placed token's state under the placement mask, and the cache of their keys
    and values; with `width`, only buffer positions < width are read (those past it must be
    PAD) and the states past it are zero."""
    width = t if width is None else width
    placed = tok[:, :width] != tokenizers.PAD
    st = steps[:, :width]
    mask = (placed[:, None, :] & (st[:, None, :] <= st[:, :, None]))[:, None]
    mask = jnp.pad(mask, [(0, 0), (0, 0), (0, 0), (0, t - width)])
    h, cache = net.extend_hidden(model.inputs(tok[:, :width], u[:, :width]),
                                 jnp.where(placed, idx[:width], t), mask, net.init_cache(b, t))
    pad = lambda a: jnp.pad(a, [(0, 0), (0, t - width), (0, 0)])
    hl, hr = model.slot_halves(h)
    return pad(hl), pad(hr), cache

  def encode_given(tok, u, steps):
    """`encode_all` of the given tokens at the narrowest compiled width past the last of
    them (the room after them is PAD): the cached decoder's first pass."""
    last = jnp.max(jnp.where(tok != tokenizers.PAD, idx + 1, 0))
    widths = _capacities(t)
    branch = jnp.searchsorted(jnp.asarray(widths), last)
    return (*jax.lax.switch(branch, [lambda w=w: encode_all(tok, u, steps, w) for w in widths]),
            jnp.asarray(widths)[branch])

  def encode_new(tok, u, hl, hr, count, m, cache):
    """Encodes the tokens at buffer positions count .. count + m - 1 of each row against
    the cache, at the narrowest compiled width that holds them."""
    def at_width(width):
      def run(hl, hr, cache):
        q = jnp.minimum(count[:, None] + jnp.arange(width), t - 1)
        write = jnp.where(jnp.arange(width) < m[:, None], q, t)
        mask = jnp.broadcast_to((idx < (count + m)[:, None])[:, None, None, :],
                                (b, 1, width, t))
        hq, cache = net.extend_hidden(model.inputs(tok[rows, q], u[rows, q]), write, mask,
                                      cache)
        new_l, new_r = model.slot_halves(hq)
        return (hl.at[rows, write].set(new_l, mode="drop"),
                hr.at[rows, write].set(new_r, mode="drop"), cache)
      return run
    widths = _capacities(t)
    branch = jnp.searchsorted(jnp.asarray(widths), jnp.max(m))
    return (*jax.lax.switch(branch, [at_width(w) for w in widths], hl, hr, cache),
            jnp.asarray(widths)[branch])

  def choose(tok, u, region, hl, hr, order, count, k_draw):
    """Each row's actions on its canvas, read through `order` at the narrowest compiled
    width that holds every row's canvas (the slots past it are padding): (insert after
    canvas index (B, T), the words, their FPE vectors, the step's log-probability, whether
    any slot was open)."""
    def at_width(width):
      def run(tok, u, region, hl, hr, order, count):
        valid = order[:, :width] < t
        o = jnp.minimum(order[:, :width], t - 1)
        o_next = jnp.concatenate([o[:, 1:], o[:, -1:]], axis=1)
        c = {"inputs": jnp.where(valid, tok[rows, o], tokenizers.PAD),
             "segment_ids": valid.astype(jnp.int32)}
        c_region = jnp.where(valid, region[rows, o], 0)
        nxt_region = jnp.concatenate([c_region[:, 1:], jnp.zeros_like(c_region[:, :1])], 1)
        open_ = slots(c) & (c_region <= 1) & (nxt_region >= 1)
        lp = history.normalize_actions(*model.slot_head(hl[rows, o] + hr[rows, o_next]),
                                       open_, c["segment_ids"], distribution)
        room = t - count
        if decoding == "parallel":
          ins, w = parallel_action(k_draw, lp, open_, room, **draw)
          chosen = jnp.take_along_axis(lp, w[..., None], axis=-1)[..., 0]
          step_lp = jnp.sum(jnp.where(open_, chosen - jax.nn.logsumexp(lp, axis=-1), 0.0), 1)
        else:
          ins, w = sequential_action(k_draw, lp, open_, room, slot_final=slot_final, **draw)
          word_lp = jnp.take_along_axis(lp[jnp.arange(b), jnp.argmax(ins, axis=1)], w[:, :1],
                                        axis=1)[:, 0]
          stop_lp = jax.nn.logsumexp(
              jnp.where(open_, lp[..., tokenizers.EOS], sampling.NEG_INF), axis=1)
          step_lp = jnp.where(jnp.any(ins, axis=1), word_lp, stop_lp)
        u_new = model.between(u[rows, o], u[rows, o_next])
        pad = lambda a, fill: jnp.pad(a, [(0, 0), (0, t - width)] + [(0, 0)] * (a.ndim - 2),
                                      constant_values=fill)
        return (pad(ins, False), pad(w, 0), pad(u_new, 0.0), step_lp,
                jnp.any(open_, axis=1, keepdims=True))
      return run
    widths = _capacities(t)
    branch = jnp.searchsorted(jnp.asarray(widths), jnp.max(count))
    return jax.lax.switch(branch, [at_width(w) for w in widths], tok, u, region, hl, hr, order,
                          count)

  def body(state):
    tok, u, steps, hl, hr, cache, region, order, count, done, key, i, logp, encoded = state
    key, k_draw = jax.random.split(key)
    valid = order < t
    ins, w, u_new, step_lp, any_open = choose(tok, u, region, hl, hr, order, count, k_draw)
    ins = ins & ~done[:, None] & any_open
    logp = logp + jnp.where(done, 0.0, step_lp)
    m = jnp.sum(ins, axis=1, dtype=jnp.int32)
    # the new tokens take buffer positions count, count + 1, ... in canvas order
    new_at = jnp.where(ins, count[:, None] + jnp.cumsum(ins, axis=1, dtype=jnp.int32) - 1, t)
    tok = tok.at[rows, new_at].set(w, mode="drop")
    u = u.at[rows, new_at].set(u_new, mode="drop")
    region = region.at[rows, new_at].set(1, mode="drop")
    steps = steps.at[rows, new_at].set(base + i, mode="drop")
    shift = jnp.cumsum(ins, axis=1, dtype=jnp.int32) - ins
    order = (jnp.full((b, t), t, jnp.int32)
             .at[rows, jnp.where(valid, idx + shift, t)].set(order, mode="drop")
             .at[rows, jnp.where(ins, idx + shift + 1, t)].set(new_at, mode="drop"))
    if kv_cache:
      hl, hr, cache, width = encode_new(tok, u, hl, hr, count, m, cache)
    else:
      (hl, hr, _), width = encode_all(tok, u, steps), t
    return (tok, u, steps, hl, hr, cache, region, order, count + m,
            done | (m == 0) | (count + m >= t), key,
            i + 1, logp, encoded + width)

  def cond(state):
    return ~jnp.all(state[9]) & (state[11] < t)

  if kv_cache:
    hl, hr, cache, first = encode_given(canvas_BxT, u0, steps0)
  else:
    (hl, hr, cache), first = encode_all(canvas_BxT, u0, steps0), jnp.asarray(t, jnp.int32)
  order0 = jnp.where(real0, idx, t)
  init = (canvas_BxT, u0, steps0, hl, hr, cache if kv_cache else None, region_BxT, order0,
          jnp.sum(real0, axis=1, dtype=jnp.int32), jnp.zeros((b,), bool), rng, 0,
          jnp.zeros((b,), jnp.float32), first)
  tok, _, steps, _, _, _, region, order, _, _, _, calls, logp, encoded = jax.lax.while_loop(
      cond, body, init)
  valid = order < t
  o = jnp.minimum(order, t - 1)
  out = lambda a, fill: jnp.where(valid, a[rows, o], fill)
  return (out(tok, tokenizers.PAD), out(region, 0),
          {"calls": calls, "steps": out(steps, 0), "logp": logp, "encoded": encoded})
