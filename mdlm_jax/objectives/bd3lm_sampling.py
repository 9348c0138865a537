"""Block diffusion sampling (`bd3lm`; docs/objectives.md): blocks left to right, each denoised
from all-MASK in at most `steps` network calls, conditioned on the finished blocks.

The first block starts right after the prompt: the prompt is left-padded with PAD to a whole
number of blocks, and no position attends to the padding (a document that starts inside a
block, as in packed training rows). So every block the sampler writes has L' positions to
draw (but the last, where `max_new_tokens` cuts it), and a prompt of BOS alone costs no call
of its own.

With `kv_cache` (the default) the finished blocks' keys and values are computed once, from
their clean tokens, and kept: a step encodes only the current block's L' positions against
the cache. The call that writes a finished block also gives the next block's first logits
(the 2 L' new positions attend block-causally), so a block costs exactly the calls of its
steps. Without the cache every step re-encodes the canvas under the block-causal mask (the
baseline); both give the same tokens. Under `left_to_right` and `dilated` a call's last
layer, logits and draws cover only the positions the next step commits.

Rules for a step, over the current block's masked positions (every draw after temperature
and top-k / top-p / min-p filtering, with `sampling.draw`):
- `ancestral` (the default; MDLM within the block): reveal each with probability
  (m(t) - m(s)) / m(t) on the uniform time grid from 1 to 0.
- `random`: commit ceil(masked / steps left) positions chosen uniformly; with steps = L'
  exactly one token per call, in a uniformly random order (the model's own factorisation
  sampled exactly, one position at a time).
- `left_to_right`: commit the ceil(masked / steps left) leftmost; with steps = L' one token
  per call in reading order (the block-causal model read as a left-to-right one).
- `dilated`: commit the ceil(masked / steps left) first in a coarse-to-fine order, the
  bit-reversed position (blocks of 4: 0, 2, 1, 3; of 8: 0, 4, 2, 6, 1, 5, 3, 7), so the
  positions a call commits together lie far apart, where their joint depends least on
  drawing them independently (dilated unmasking; 2 steps a block of 4: {0, 2}, then {1, 3}).
  The order is over the positions the block has to draw (its rank among them, bit-reversed
  over their count): a last block the cap cuts to 3 draws 0 and 2, then 1.
- `confidence`: commit the ceil(masked / steps left) most confident (probability of the
  drawn token).
- `threshold` (Fast-dLLM): commit every position whose top probability (at temperature 1,
  over the tokens the filters keep) is above `threshold`, and at least ceil(masked / steps
  left): when fewer pass, the rest are topped up in the `fallback` order, the most confident
  first (Fast-dLLM's; with steps = L' that is one when none passes), or `random` (one chosen
  uniformly, which keeps a weak model from filling blocks in its most-confident order, the
  order that degenerates into repeated tokens), `left_to_right` or `dilated`. With fewer
  steps than L' the steps set a floor of tokens a call and the threshold adds the easy ones
  (2 steps a block of 4 with `dilated`: {0, 2} and whatever else passes, then the rest).
  The token committed is the one drawn. The gate never looks at the draw, so a committed token
  follows the model's distribution at any temperature; gating on the drawn token's own
  probability would re-draw the unlikely draws and lower the samples' entropy. At
  temperature 0 the two gates are the same.
The last allowed step commits whatever is left, so a block never ends with a MASK.
Generation stops when every row has produced EOS (the output length is free; the tokens
after a row's EOS are PAD) or at `max_new_tokens`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import attention
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.model import take_positions
from mdlm_jax.objectives import base
from mdlm_jax.objectives import mdlm_schedule

RULES = ("ancestral", "random", "left_to_right", "dilated", "confidence", "threshold")
FALLBACKS = ("confident", "random", "left_to_right", "dilated")   # the threshold rule's top-up


def dilated_order(n: int) -> list[int]:
  """Each of n positions' place in the coarse-to-fine order, its index with the bits
  reversed (over the bits of n - 1; distinct, so a ranking)."""
  bits = max(1, (n - 1).bit_length())
  return [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]


def dilated_places(open_BxL):
  """(B, L) int32: each open position's place in the dilated order over the open ones (its
  rank among them in reading order, as `dilated_order` of their count places it), so that a
  block with positions 1, 2, 3 open commits 1 and 3 first, not the adjacent 2 and 1."""
  n = open_BxL.shape[1]
  table = jnp.asarray([dilated_order(m) + [n] * (n - m) for m in range(n + 1)], jnp.int32)
  rank = jnp.maximum(jnp.cumsum(open_BxL, axis=1) - 1, 0)
  return table[jnp.sum(open_BxL, axis=1, keepdims=True), rank]


def commit(rule: str, k, steps: int, masked_BxL, conf_BxL, key, *, threshold: float,
           schedule: str = "linear", fallback: str = "confident", open_BxL=None):
  """Which masked positions a step commits (B, L) bool, given the log confidences `conf_BxL`
  (the drawn tokens' probabilities; the top probabilities for `threshold`); step k of at
  most `steps` (the last commits all). `open_BxL`: the positions the block had to draw at
  its first step (the dilated order is over them; default: the masked ones)."""
  conf = jnp.where(masked_BxL, conf_BxL, -jnp.inf)
  count = -(-jnp.sum(masked_BxL, axis=1) // (steps - k))   # ceil(masked / steps left)

  def first(order, candidates_BxL, how_many):
    """The `how_many` (B,) candidates first in `order` ('confidence': the most confident)."""
    n = candidates_BxL.shape[1]
    if order == "confidence":
      place = -conf
    elif order == "random":
      place = jax.random.uniform(key, candidates_BxL.shape)
    else:
      place = (jnp.broadcast_to(jnp.arange(n), candidates_BxL.shape) if order == "left_to_right"
               else dilated_places(masked_BxL if open_BxL is None else open_BxL))
      place = place.astype(jnp.float32)
    rank = base.rank_in_row(jnp.where(candidates_BxL, place, jnp.inf))
    return candidates_BxL & (rank < how_many[:, None])

  if rule in ("confidence", "random", "left_to_right", "dilated"):
    chosen = first(rule, masked_BxL, count)
  elif rule == "threshold":   # the passing ones, topped up to the step's count by `fallback`
    passing = masked_BxL & (conf > jnp.log(threshold))
    short = jnp.maximum(count - jnp.sum(passing, axis=1), 0)
    order = "confidence" if fallback == "confident" else fallback
    chosen = passing | first(order, masked_BxL & ~passing, short)
  elif rule == "ancestral":
    t, s = 1.0 - k / steps, 1.0 - (k + 1) / steps
    m_t = mdlm_schedule.mask_fraction(schedule, jnp.asarray(t, jnp.float32))[0]
    m_s = mdlm_schedule.mask_fraction(schedule, jnp.asarray(s, jnp.float32))[0]
    chosen = jax.random.uniform(key, masked_BxL.shape) < (m_t - m_s) / m_t
  else:
    raise ValueError(f"--sampler={rule!r} is unknown for bd3lm; choose one of {RULES}.")
  return masked_BxL & (chosen | (k >= steps - 1))


def _commit_counts(size: int, steps: int) -> list[int]:
  """How many positions each step commits in a block with all `size` to draw under a rule
  that commits ceil(masked / steps left) (a block with fewer to draw commits no more)."""
  counts, masked = [], size
  for k in range(steps):
    if masked == 0:
      break
    counts.append(masked if k == steps - 1 else -(-masked // (steps - k)))
    masked -= counts[-1]
  return counts


def generate(model, prompt_BxP, rng, *, block_size: int, rule: str, steps: int,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, threshold: float = 0.9, kv_cache: bool = True,
             schedule: str = "linear", fallback: str = "confident", noised_from: int = 0):
  """Samples up to `max_new_tokens` after `prompt_BxP` (B, P), the first block right after
  the prompt (whose positions are never changed); the block being denoised enters the network
  at layer `noised_from` (`bd3lm`'s `noised_layers`). Returns
  ((B, P + max_new_tokens) int32, info) with info["calls"] (network calls) and
  info["blocks"] (blocks generated)."""
  if rule not in RULES:
    raise ValueError(f"--sampler={rule!r} is unknown for bd3lm; choose one of {RULES}.")
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback={fallback!r} must be one of {FALLBACKS}.")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"--threshold={threshold} must be in (0, 1].")
  size = block_size
  b, p = prompt_BxP.shape
  pad = -p % size   # PAD before the prompt, which then ends at a block's end
  width = pad + p + -(-max_new_tokens // size) * size
  n_blocks = width // size
  canvas = jnp.concatenate([jnp.full((b, pad), tokenizers.PAD, jnp.int32),
                            prompt_BxP.astype(jnp.int32),
                            jnp.full((b, width - pad - p), tokenizers.MASK, jnp.int32)], axis=1)
  idx = jnp.arange(width)
  p += pad   # from here on, positions count the padding
  block_of = lambda x, blk: jax.lax.dynamic_slice_in_dim(x, blk * size, size, axis=1)
  # a last block the cap cuts: the positions past it stay MASK, never drawn nor waited for
  wanted = jnp.broadcast_to(idx < p + max_new_tokens, (b, width))
  to_draw = lambda x, blk: (block_of(x, blk) == tokenizers.MASK) & block_of(wanted, blk)
  subs = lambda h: model.logits(h).at[..., tokenizers.MASK].set(sampling.NEG_INF)
  # `left_to_right` and `dilated` know which positions a step commits before its logits: a call
  # then computes the last layer and the logits only at those (the most any step commits,
  # `read` of them), and a step draws only there. Other rules read the whole block.
  planned = rule in ("left_to_right", "dilated")
  read = max(_commit_counts(size, steps)) if planned else size
  rows = jnp.arange(b)[:, None]

  def reads(x, blk, k, opened):
    """(B, read) positions in block `blk` whose logits step k reads: the ones it commits
    (first, in reading order) when `planned`, else all."""
    if not planned:
      return jnp.broadcast_to(jnp.arange(size), (b, size))
    masked = to_draw(x, blk)
    chosen = commit(rule, k, steps, masked, jnp.zeros(masked.shape), None,
                    threshold=threshold, open_BxL=opened)
    return jnp.argsort(~chosen, axis=1, stable=True)[:, :read]

  if kv_cache:
    def logits_at(x, blk, at, cache, blocks: int = 1):
      """Encodes blocks blk - blocks + 1 .. blk into the cache (all but the last are clean:
      written for good); returns block blk's logits at positions `at` and the cache. A noised
      block's keys go to its own slot, which the clean ones overwrite later."""
      start = blk - blocks + 1
      new = jax.lax.dynamic_slice_in_dim(x, start * size, blocks * size, axis=1)
      h, cache = model.decode_hidden(new, [dict(c, index=start * size) for c in cache],
                                     block=size, start=pad,
                                     outputs=(blocks - 1) * size + at if planned else size,
                                     late=(size, noised_from) if noised_from else None)
      return subs(h), cache
  else:
    pos = jnp.broadcast_to(idx, (b, width))
    seg = (pos >= pad).astype(jnp.int32)   # the padding: a segment of its own
    mask = attention.attention_mask(seg, seg, pos // size, pos // size, causal=True)

    def logits_at(x, blk, at, cache, blocks: int = 1):
      h = model.embed_tokens(x)
      if noised_from:   # the clean blocks' states there, the block's own embeddings
        h = jax.lax.dynamic_update_slice_in_dim(
            model.hidden(h, pos, seg, mask_Bx1xTxT=mask, layers=(0, noised_from)),
            block_of(h, blk), blk * size, axis=1)
      h = block_of(model.hidden(h, pos, seg, mask_Bx1xTxT=mask,
                                layers=(noised_from, model.cfg.num_layers)), blk)
      return subs(take_positions(h, at) if planned else h), cache

  first = p // size
  at = reads(canvas, first, 0, to_draw(canvas, first))
  cache = model.init_cache(b, width) if kv_cache else None
  # the prompt's blocks and the first block to generate, in one call
  logits, cache = logits_at(canvas, first, at, cache, blocks=first + 1)

  def block_cond(c):
    blk, _, _, _, _, done, _ = c
    return (blk < n_blocks) & ~jnp.all(done)

  def block_body(c):
    blk, x, cache, logits, at, done, calls = c
    key = jax.random.fold_in(rng, blk)
    opened = to_draw(x, blk)   # what the block has to draw (the dilated order's positions)

    def step(c):
      k, x, logits, at, calls, cache = c
      k_tok, k_rule = jax.random.split(jax.random.fold_in(key, k))
      tok, logp = sampling.draw(k_tok, logits, temperature, top_k, top_p, min_p)
      xb = block_of(x, blk)
      masked = to_draw(x, blk)
      if planned:   # drawn at `at` only; the commit does not look at the confidences
        tok, conf = jnp.zeros_like(xb).at[rows, at].set(tok), jnp.zeros(masked.shape)
      else:
        conf = (jnp.max(logp, axis=-1) if rule == "threshold"
                else jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0])
      chosen = commit(rule, k, steps, masked, conf, k_rule, threshold=threshold,
                      schedule=schedule, fallback=fallback, open_BxL=opened)
      x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(chosen, tok, xb), blk * size, axis=1)
      more = jnp.any(to_draw(x, blk))

      def again():
        nxt = reads(x, blk, k + 1, opened)
        return (*logits_at(x, blk, nxt, cache), nxt, calls + 1)

      logits, cache, at, calls = jax.lax.cond(more, again, lambda: (logits, cache, at, calls))
      return k + 1, x, logits, at, calls, cache

    unfinished = lambda c: jnp.any(to_draw(c[1], blk))
    _, x, logits, at, calls, cache = jax.lax.while_loop(
        unfinished, step, (jnp.zeros((), jnp.int32), x, logits, at, calls, cache))
    made = (blk * size + jnp.arange(size)) >= p
    done = done | jnp.any((block_of(x, blk) == tokenizers.EOS) & made, axis=1)

    def next_block():  # with the cache: this block's clean keys written in the same call
      nxt = reads(x, blk + 1, 0, to_draw(x, blk + 1))
      return (*logits_at(x, blk + 1, nxt, cache, blocks=2 if kv_cache else 1), nxt, calls + 1)

    if n_blocks > 1:   # (one block: nothing follows, and two blocks would not fit)
      go_on = (blk + 1 < n_blocks) & ~jnp.all(done)
      logits, cache, at, calls = jax.lax.cond(go_on, next_block,
                                              lambda: (logits, cache, at, calls))
    return blk + 1, x, cache, logits, at, done, calls

  carry = (jnp.asarray(first, jnp.int32), canvas, cache, logits, at, jnp.zeros((b,), bool),
           jnp.ones((), jnp.int32))
  blk, x, _, _, _, _, calls = jax.lax.while_loop(block_cond, block_body, carry)
  made = idx[None, :] >= p
  eos = (x == tokenizers.EOS) & made
  after = (jnp.cumsum(eos, axis=1) - eos) > 0
  x = jnp.where(after | (x == tokenizers.MASK), tokenizers.PAD, x)
  return x[:, pad:p + max_new_tokens], {"calls": calls, "blocks": blk - first}
