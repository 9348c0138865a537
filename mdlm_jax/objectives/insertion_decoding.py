"""Decoding an insertion model: one parallel or sequential action per network call, the loop
that applies them to a canvas, and which decoding a finalization allows."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import sampling
from mdlm_jax import tokenizers
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
    return canvas, u, region, done | ~jnp.any(ins, axis=1), key, i + 1

  def cond(state):
    return ~jnp.all(state[3]) & (state[5] < t)

  init = (canvas_BxT, u0, region_BxT, jnp.zeros((b,), bool), rng, 0)
  canvas, _, region, _, _, calls = jax.lax.while_loop(cond, body, init)
  return canvas, region, {"calls": calls}
