"""Samplers for masked-diffusion models (docs/objectives.md): `ancestral` (MDLM / MD4, with
the no-change cache), `confidence` (MaskGIT) and `llada` (low-confidence or random remasking,
semi-autoregressive blocks, classifier-free guidance).

Every sampler fills the MASK positions of a canvas (B, T) and never changes any other token,
so one code path serves unconditional generation, prefix prompts, suffix conditioning and
infilling. All are jitted loops (`lax.fori_loop` / `lax.while_loop`), batched, and draw with
the high-dynamic-range Gumbel of `sampling.py` after top-k / top-p / min-p filtering.
Each returns (tokens (B, T), info) where info holds `calls` (network evaluations) and, when
`snapshots` > 0, `history` (snapshots, B, T): the canvas after evenly spaced steps.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdlm_jax import model as model_lib
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import mdlm_schedule


def network(objective, model):
  """(canvas (B, T), cond) -> (float32 SUBS logits (B, T, V), next cond); one document per
  row. For a self-conditioned model `cond` carries the previous call's final states (None
  at the first call: the null embedding); otherwise it is passed through untouched. `time`
  (a scalar) is read by a time-conditioned model only."""
  def fn(x_BxT, cond=None, time=None):
    b, t = x_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    t_b = None if time is None else jnp.broadcast_to(jnp.asarray(time, jnp.float32), (b,))
    logits, h = objective.apply(model, x_BxT, pos, jnp.ones((b, t), jnp.int32), cond, t_b)
    if not objective.self_conditioned:
      return logits, cond
    return logits, h.astype(jnp.float32)
  return fn


def initial_condition(objective, model, canvas):
  """The carried self-conditioning input: the null embedding (a dummy without self-cond)."""
  if objective.self_conditioned:
    return model.null_condition(canvas.shape).astype(jnp.float32)
  return jnp.zeros((), jnp.float32)


def _record(history, x, k, steps):
  """Snapshot j of n (n <= steps) is the canvas after step ceil((j + 1) steps / n) - 1: evenly
  spaced, the last one the final canvas."""
  if history is None:
    return None
  n = history.shape[0]
  slot = (k + 1) * n // steps - 1
  due = (k + 1) * n // steps != k * n // steps
  return jnp.where(due, history.at[slot].set(x), history)


def _history(snapshots, x):
  return jnp.zeros((snapshots,) + x.shape, jnp.int32) if snapshots else None


def time_grid(steps: int, grid: str):
  """t_0 = 1 > t_1 > ... > t_S = 0."""
  r = jnp.arange(steps + 1, dtype=jnp.float32) / steps
  if grid == "uniform":
    return 1.0 - r
  if grid == "cosine":
    return jnp.cos(0.5 * math.pi * r)
  raise ValueError(f"time grid {grid!r} is unknown; choose 'uniform' or 'cosine'.")


def ancestral(objective, model, canvas, rng, *, steps, temperature=1.0, top_k=0, top_p=1.0,
              min_p=0.0, grid="uniform", cache=True, sync_rows=True, snapshots=0):
  """From t to s every masked position is revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t) with a token drawn from p_theta; revealed tokens never
  change; masks left at t = 0 take the argmax. With `cache`, the network is called only when
  the canvas changed since its last call (the model is not time-conditioned, so its output
  would be the same); a self-conditioned or time-conditioned model is called at every step,
  since its input changes with the previous call's states or with t.

  `sync_rows`: while every row has the same number of masks, the number revealed at a step,
  Binomial(masks, prob) (row 0's draw), is shared and each row reveals that many of its masks
  chosen uniformly. Each row's distribution is exactly the independent sampler's (a Binomial count,
  then a uniform subset); only the timing is shared, so a batch changes at no more steps than
  one row does and the cache skips as many calls for B rows as for one."""
  net = network(objective, model)
  cache = cache and not (objective.self_conditioned or objective.time_conditioned)
  ts = time_grid(steps, grid)
  opts = objective.opts
  b, t = canvas.shape

  def body(k, carry):
    x, logits, cond, stale, calls, history = carry
    if cache:
      logits, cond, calls = jax.lax.cond(stale, lambda: (*net(x, cond, ts[k]), calls + 1),
                                         lambda: (logits, cond, calls))
    else:
      (logits, cond), calls = net(x, cond, ts[k]), calls + 1
    p_t, p_s = mdlm_schedule.mask_prob(opts, ts[k]), mdlm_schedule.mask_prob(opts, ts[k + 1])
    reveal_prob = jnp.where(ts[k + 1] <= 0.0, 1.0, (p_t - p_s) / p_t)
    k_tok, k_rev, k_pick = jax.random.split(jax.random.fold_in(rng, k), 3)
    tok, _ = sampling.draw(k_tok, logits, temperature, top_k, top_p, min_p)
    masked = x == tokenizers.MASK
    reveal = masked & (jax.random.uniform(k_rev, x.shape) < reveal_prob)
    if sync_rows:
      counts = jnp.sum(masked, axis=1)
      shared = base.choose_count(k_pick, masked, jnp.broadcast_to(jnp.sum(reveal[0]), (b,)))
      reveal = jnp.where(jnp.all(counts == counts[0]), shared, reveal)
    x = jnp.where(reveal, tok, x)
    return x, logits, cond, jnp.any(reveal), calls, _record(history, x, k, steps)

  v = objective.vocab_size
  carry = (canvas, jnp.zeros((b, t, v), jnp.float32), initial_condition(objective, model, canvas),
           jnp.array(True), jnp.zeros((), jnp.int32), _history(snapshots, canvas))
  x, logits, cond, stale, calls, history = jax.lax.fori_loop(0, steps, body, carry)
  left = x == tokenizers.MASK
  logits, calls = jax.lax.cond(jnp.any(left) & (stale | (not cache)),
                               lambda: (net(x, cond, 0.0)[0], calls + 1),
                               lambda: (logits, calls))
  x = jnp.where(left, jnp.argmax(logits, axis=-1).astype(jnp.int32), x)
  return x, {"calls": calls, "history": history}


def confidence(objective, model, canvas, rng, *, steps, temperature=1.0, top_k=0, top_p=1.0,
               min_p=0.0, remask=False, critic=False, critic_noise=1.0, snapshots=0):
  """MaskGIT: after step k of S, floor(N gamma((k + 1) / S)) positions stay masked (gamma the
  objective's mask-fraction schedule, N the initial mask count); every masked position is
  sampled at a temperature annealed linearly to 0 and the most confident are kept: highest
  probability of the sampled token, or with `critic` the lowest critic score (its logit that
  the token is wrong) plus Gumbel noise of scale `critic_noise` annealed to 0. With `remask`,
  earlier choices compete again and can be remasked."""
  if critic and not (hasattr(model, "critic") and model.critic_kind != "none"):
    raise ValueError("critic scores need a model trained with objective.critic='self' or "
                     "'separate'.")
  net = network(objective, model)
  schedule = objective.opts.schedule
  generated = canvas == tokenizers.MASK
  n0 = jnp.sum(generated, axis=1)

  b, t = canvas.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def body(k, carry):
    x, cond, history = carry
    logits, cond = net(x, cond, 1.0 - k / steps)
    frac = 1.0 - (k + 1) / steps
    k_tok, k_noise = jax.random.split(jax.random.fold_in(rng, k))
    tok, logp = sampling.draw(k_tok, logits, temperature * frac, top_k, top_p, min_p)
    masked = x == tokenizers.MASK
    cand_tok = jnp.where(masked, tok, x)
    if critic:
      score = model.critic(cand_tok, pos, jnp.ones((b, t), jnp.int32))
      conf = -(score + critic_noise * frac * sampling.gumbel(k_noise, score.shape))
    else:
      conf = jnp.take_along_axis(logp, cand_tok[..., None], axis=-1)[..., 0]
    pool = generated if remask else masked
    conf = jnp.where(pool, conf, -jnp.inf)
    gamma = mdlm_schedule.mask_fraction(schedule, jnp.asarray(frac, jnp.float32))[0]
    stay = jnp.floor(n0 * gamma + 1e-4).astype(jnp.int32)   # (float rounding of exact counts)
    reveal = jnp.maximum(jnp.sum(pool, axis=1) - stay, 0)       # the pool keeps `stay` masks
    keep = pool & (base.rank_in_row(-conf) < reveal[:, None])
    x = jnp.where(pool, jnp.where(keep, cand_tok, tokenizers.MASK), x)
    return x, cond, _record(history, x, k, steps)

  carry = (canvas, initial_condition(objective, model, canvas), _history(snapshots, canvas))
  x, _, history = jax.lax.fori_loop(0, steps, body, carry)
  return x, {"calls": jnp.asarray(steps * (2 if critic else 1), jnp.int32), "history": history}


def guided(net, x, fixed, cfg_scale: float, cond=None, time=None):
  """Classifier-free guidance: u + (w + 1)(c - u), u from the canvas with every given token
  (BOS, prompt, suffix; padding aside) masked. With guidance `cond` is the pair of the two
  branches' self-conditioning states, each fed back to its own branch. Returns (logits,
  next cond)."""
  if cfg_scale <= 0:
    return net(x, cond, time)
  cond_c, cond_u = cond
  c, next_c = net(x, cond_c, time)
  unc = jnp.where(fixed & (x != tokenizers.PAD), tokenizers.MASK, x)
  u, next_u = net(unc, cond_u, time)
  return u + (cfg_scale + 1.0) * (c - u), (next_c, next_u)


class BlockCache:
  """Fast-dLLM's block caches for a bidirectional network decoding in blocks (approximations):
  `refresh` encodes the whole canvas and keeps every position's keys and values; `window`
  then encodes, against that cache, each row's current block (B, L positions from `start_B`)
  alone (`kind='dual'`: the canvas after it kept as it was at the last refresh too), or the
  block and everything after it (`kind='prefix'`: only the finished prefix is cached), the
  positions it encodes having their keys rewritten. Right after a refresh a window's logits
  are the full pass's (tested); they drift from it as the block's tokens change (in a
  one-layer network the prefix window stays exact). Logits are SUBS (MASK never predicted)."""

  KINDS = ("prefix", "dual")

  def __init__(self, model, batch: int, width: int, size: int, kind: str = "dual"):
    if kind not in self.KINDS:
      raise ValueError(f"kv_cache={kind!r} must be None or one of {self.KINDS}.")
    self.model, self.width, self.size, self.kind = model, width, size, kind
    self.rows = jnp.arange(batch)[:, None]
    # prefix windows reach the row's end: compiled at widths size, 2 size, 4 size, ... width
    self.widths = [size]
    while kind == "prefix" and self.widths[-1] < width:
      self.widths.append(min(2 * self.widths[-1], width))

  def init(self):
    return self.model.init_cache(self.rows.shape[0], self.width)

  def _subs(self, h):
    return self.model.logits(h).at[..., tokenizers.MASK].set(sampling.NEG_INF)

  def refresh(self, x, cache):
    """(logits (B, T, V), cache) of the full pass."""
    cache = [dict(c, index=jnp.zeros((), jnp.int32)) for c in cache]
    h, cache = self.model.decode_hidden(x, cache, block=self.width)
    return self._subs(h), cache

  def _encode(self, x, start_B, logits, cache, size: int):
    cfg = self.model.cfg
    idx = start_B[:, None] + jnp.arange(size)
    safe = jnp.minimum(idx, self.width - 1)
    rope = model_lib.rope_tables(safe, cfg.head_dim, cfg.rope_base, cfg.max_seq_len)
    mask = jnp.ones((idx.shape[0], 1, size, self.width), bool)
    x_w = self.model.embed_tokens(jnp.take_along_axis(x, safe, axis=1))
    h, cache = self.model._cached_blocks(x_w, rope, mask, cache, idx)  # pylint: disable=protected-access
    return logits.at[self.rows, idx].set(self._subs(h), mode="drop"), cache

  def window(self, x, start_B, logits, cache):
    """(`logits` with each row's window from `start` recomputed, cache, the positions each
    row encoded: the narrowest compiled width that reaches every row's end for `prefix`)."""
    need = jnp.max(self.width - start_B) if self.kind == "prefix" else self.size
    branch = jnp.searchsorted(jnp.asarray(self.widths), need)
    fns = [lambda x, s, lg, c, w=w: self._encode(x, s, lg, c, w) for w in self.widths]
    return (*jax.lax.switch(branch, fns, x, start_B, logits, cache),
            jnp.asarray(self.widths)[branch])


def llada(objective, model, canvas, rng, *, steps, temperature=0.0, top_k=0, top_p=1.0,
          min_p=0.0, block_length=0, remasking="low_confidence", cfg_scale=0.0, threshold=0.0,
          kv_cache=None, snapshots=0):
  """LLaDA: the masked span is cut into blocks of `block_length` positions (0: one block)
  counted from each row's first MASK, filled strictly in order; the steps are shared evenly
  among the blocks that hold masks, and each step commits ceil(masked in block / steps left
  for the block) positions of the current block: the most confident (`low_confidence`) or
  random ones (`random`). With `threshold` > 0 (Fast-dLLM's parallel decoding) a step
  commits instead every position of the current block whose top probability (temperature 1)
  exceeds the threshold; when none does, one: the most confident (`low_confidence`) or one
  chosen uniformly (`random`). The gate never looks at the draw, so committed tokens follow
  the model at any temperature. `steps` is then a cap, and the loop ends as soon as nothing
  is masked. Committed tokens never change.
  `kv_cache` (Fast-dLLM's block caches, `BlockCache`): the canvas is encoded whole only at the
  first step and after any row finishes a block; other steps encode each row's current block
  alone against the cached keys of the rest ('dual'), or the block and everything after it
  against the cached keys of the finished prefix ('prefix'). Approximations for this
  bidirectional network; info["encoded"] counts the positions encoded per row."""
  if kv_cache not in (None, *BlockCache.KINDS):
    raise ValueError(f"kv_cache={kv_cache!r} must be None or one of {BlockCache.KINDS}.")
  if kv_cache and (cfg_scale > 0 or block_length <= 0
                   or not isinstance(model, model_lib.Transformer)):
    raise ValueError(f"kv_cache={kv_cache!r} needs block_length > 0, cfg_scale=0 and a model "
                     "without self-conditioning, critic or time conditioning.")
  if remasking not in ("low_confidence", "random"):
    raise ValueError(f"remasking={remasking!r} must be 'low_confidence' or 'random'.")
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"threshold={threshold} must be in [0, 1) (0: LLaDA's step counts).")
  net = network(objective, model)
  b, t = canvas.shape
  fixed = canvas != tokenizers.MASK
  idx = jnp.arange(t)[None, :]
  first = jnp.argmin(fixed, axis=1)            # first MASK of each row
  size = block_length if block_length > 0 else t
  block = jnp.where(fixed, -1, (idx - first[:, None]) // size)
  n_blocks = jnp.sum(jax.vmap(lambda r: jnp.bincount(r + 1, length=t + 1)[1:] > 0)(block),
                     axis=1)
  per_block = jnp.maximum(steps // jnp.maximum(n_blocks, 1), 1)
  calls_per_step = 2 if cfg_scale > 0 else 1

  blocks = BlockCache(model, b, t, size, kv_cache) if kv_cache else None

  def body(k, carry):
    x, spent, cond, history, _, kv = carry
    masked = x == tokenizers.MASK
    current = jnp.min(jnp.where(masked, block, t), axis=1)          # leftmost unfinished block
    in_block = masked & (block == current[:, None])
    if blocks is None:
      logits, cond = guided(net, x, fixed, cfg_scale, cond, 1.0 - k / steps)
    else:
      cache, logits, refresh, encoded = kv
      logits, cache, width = jax.lax.cond(
          refresh, lambda: (*blocks.refresh(x, cache), jnp.asarray(t, jnp.int32)),
          lambda: blocks.window(x, first + jnp.minimum(current, t) * size, logits, cache))
      encoded = encoded + width
    k_tok, k_rand = jax.random.split(jax.random.fold_in(rng, k))
    tok, logp = sampling.draw(k_tok, logits, temperature, top_k, top_p, min_p)
    top = jnp.max(logp, axis=-1)
    if remasking == "low_confidence":
      conf = top if threshold > 0 else jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]
    else:
      conf = jax.random.uniform(k_rand, x.shape)
    conf = jnp.where(in_block, conf, -jnp.inf)
    left = jnp.maximum(per_block - spent, 1)
    count = -(-jnp.sum(in_block, axis=1) // left)                    # ceil division
    rank = base.rank_in_row(-conf)
    if threshold > 0:
      passing = in_block & (top > jnp.log(threshold))
      commit = passing | (in_block & (rank == 0) & ~jnp.any(passing, axis=1, keepdims=True))
    else:
      commit = in_block & (rank < count[:, None])
    x = jnp.where(commit, tok, x)
    done_block = ~jnp.any(in_block & ~commit, axis=1)
    spent = jnp.where(done_block, 0, spent + 1)
    if blocks is not None:   # a row starts a new block: encode the canvas whole again
      kv = (cache, logits, jnp.any(done_block), encoded)
    return x, spent, cond, _record(history, x, k, steps), k + 1, kv

  cond0 = initial_condition(objective, model, canvas)
  kv0 = None if blocks is None else (blocks.init(), jnp.zeros((b, t, objective.vocab_size),
                                                          jnp.float32), jnp.array(True),
                                   jnp.zeros((), jnp.int32))
  carry = (canvas, jnp.zeros((b,), jnp.int32), (cond0, cond0) if cfg_scale > 0 else cond0,
           _history(snapshots, canvas), jnp.zeros((), jnp.int32), kv0)
  if threshold > 0:   # ends when every position is committed
    x, _, cond, history, used, kv = jax.lax.while_loop(
        lambda c: (c[4] < steps) & jnp.any(c[0] == tokenizers.MASK),
        lambda c: body(c[4], c), carry)
  else:
    x, _, cond, history, used, kv = jax.lax.fori_loop(0, steps, body, carry)
  # rounding can leave masks after `steps` when a block got fewer steps than it has tokens'
  # share; finish them greedily so the output never holds MASK
  left = x == tokenizers.MASK

  def finish():
    greedy = jnp.argmax(guided(net, x, fixed, cfg_scale, cond, 0.0)[0], axis=-1)
    return jnp.where(left, greedy.astype(jnp.int32), x)

  x = jax.lax.cond(jnp.any(left), finish, lambda: x)
  calls = (used + jnp.any(left).astype(jnp.int32)) * calls_per_step
  info = {"calls": calls, "history": history}
  if blocks is not None:
    info["encoded"] = kv[3] + jnp.any(left).astype(jnp.int32) * t
  return x, info


SAMPLERS = {"ancestral": ancestral, "confidence": confidence, "llada": llada}


def run(name: str, objective, model, canvas, rng, *, steps: int, **options):
  """Dispatches to a sampler by name; returns (tokens, info)."""
  if name not in SAMPLERS:
    raise ValueError(f"sampler {name!r} is unknown; choose one of {tuple(SAMPLERS)}.")
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  if not 0 <= options.get("snapshots", 0) <= steps:
    raise ValueError(f"snapshots={options['snapshots']} must be in [0, steps={steps}].")
  return SAMPLERS[name](objective, model, canvas, rng, steps=steps, **options)
