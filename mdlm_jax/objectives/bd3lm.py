"""`bd3lm`: block diffusion (BD3-LM, Arriola et al. 2025; docs/objectives.md).

A row of T tokens is cut into blocks of `block_size` positions counted from the row's start.
The likelihood factorises over blocks, log p(x) = sum_b log p(x^b | x^{<b}), and each block's
term is bounded by masked diffusion (`mdlm`'s schedules and weights) conditioned on the clean
earlier blocks. Training runs the network once on x_t ⊕ x_0 (2T positions, both halves at
the same positions): noised block b attends to itself and to clean blocks < b, clean block b
to clean blocks <= b, and only the noised half is scored. Packed documents keep their segment
ids, so no position attends to another document; a document that starts inside a block
shares that block's noise level, never its attention.

Limits: block_size 1 is next-token prediction (each masked token sees only the clean tokens
before it; the weight 1/t cancels the masking probability t in expectation), and
block_size = T is `mdlm` (the clean half is never read by the noised one). The samplers are in
`bd3lm_sampling.py`.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from mdlm_jax import attention
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import bd3lm_sampling
from mdlm_jax.objectives import mdlm
from mdlm_jax.objectives.mdlm_schedule import elbo_weight
from mdlm_jax.objectives.mdlm_schedule import mask_prob
from mdlm_jax.objectives.mdlm_schedule import maskable
from mdlm_jax.objectives.mdlm_schedule import parse_schedule
from mdlm_jax.objectives.mdlm_schedule import sample_times


def training_mask(segment_ids_BxT, block_size: int) -> attention.BlockDiffusionMask:
  """The mask over x_t ⊕ x_0 (`.dense()`: (B, 1, 2T, 2T) bool): noised block b sees noised
  block b and clean blocks < b; clean block b sees clean blocks <= b; nothing crosses
  segments."""
  return attention.BlockDiffusionMask(segment_ids_BxT, block_size)


def block_times(rng, batch: int, blocks: int, antithetic: bool, t_min: float):
  """One time per (row, block) in (t_min, 1], antithetic over all of them (each marginally
  uniform). With one block per row these are `mdlm`'s times for the same key."""
  return sample_times(rng, batch * blocks, antithetic, t_min, 0).reshape(batch, blocks)


@objectives.register
class BD3LM(base.Objective):
  name = "bd3lm"
  causal = False
  samplers = bd3lm_sampling.RULES
  defaults = dict(
      block_size=16,           # L' (divides data.seq_len): 1 is ar, data.seq_len is mdlm
      schedule="linear",       # linear | cosine | poly{K}: mask rate (1 - eps) m(t) per block
      eps=1e-3,
      t_min=1e-3,
      time_sampling="antithetic",  # antithetic | iid, over every (row, block)
      noise_min=0.0,           # BD3-LM's clipped schedule: mask rates uniform in
      noise_max=1.0,           # [noise_min, noise_max] with weight 1/rate (linear only)
      eval_time_samples=2,     # K >= 2 draws of the validation bound per row
      noised_layers=0,         # k > 0: the noised half runs only the last k layers (below)
  )

  @classmethod
  def validate(cls, opts):
    parse_schedule(opts.schedule)
    clipped = (opts.noise_min, opts.noise_max) != (0.0, 1.0)
    checks = [
        (opts.block_size >= 1, f"objective.block_size={opts.block_size} must be >= 1."),
        (0.0 <= opts.eps < 1.0, f"objective.eps={opts.eps} must be in [0, 1)."),
        (0.0 <= opts.t_min < 1.0, f"objective.t_min={opts.t_min} must be in [0, 1)."),
        (opts.time_sampling in ("antithetic", "iid"),
         f"objective.time_sampling={opts.time_sampling!r} must be 'antithetic' or 'iid'."),
        (0.0 <= opts.noise_min <= opts.noise_max <= 1.0 and opts.noise_max > 0,
         f"objective.noise_min={opts.noise_min} and objective.noise_max={opts.noise_max} must "
         "satisfy 0 <= noise_min <= noise_max <= 1, noise_max > 0 (BD3-LM clips to e.g. "
         "0.3 and 0.8; 0 and 1: no clipping)."),
        (not clipped or opts.schedule == "linear",
         f"the clipped schedule (objective.noise_min/noise_max) draws linear mask rates; got "
         f"objective.schedule={opts.schedule!r}."),
        (opts.eval_time_samples >= 1,
         f"objective.eval_time_samples={opts.eval_time_samples} must be >= 1."),
        (opts.noised_layers >= 0,
         f"objective.noised_layers={opts.noised_layers} must be >= 0 (0: every layer)."),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    seq_len, size = config.data.seq_len, self.opts.block_size
    if seq_len % size:
      raise ValueError(f"objective.block_size={size} must divide data.seq_len={seq_len}.")
    layers = config.model.num_layers
    if self.opts.noised_layers > layers:
      raise ValueError(f"objective.noised_layers={self.opts.noised_layers} must be at most "
                       f"model.num_layers={layers} (0 or {layers}: every layer).")

  @property
  def noised_from(self) -> int:
    """The layer the noised tokens enter at (0: every layer, BD3-LM's network)."""
    k = self.opts.noised_layers
    return self.model_config.num_layers - k if k else 0

  @property
  def clipped(self) -> bool:
    return (self.opts.noise_min, self.opts.noise_max) != (0.0, 1.0)

  def noised_logits(self, model, batch, x_t):
    """SUBS logits (B, T, V) of the noised half of x_t ⊕ x_0 under `training_mask`. With
    `noised_layers` k the clean half first runs the layers before the last k alone (clean
    block b reads clean blocks <= b), and the noised half joins it there from its
    embeddings: a noised token's keys at layer l are read only by its own block, and it reads
    the clean blocks' keys of that layer (what the sampler's cache holds)."""
    x0, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
    t, size, j = x0.shape[1], self.opts.block_size, self.noised_from
    clean = model.embed_tokens(x0)
    if j:
      blk = jnp.broadcast_to(jnp.arange(t) // size, seg.shape)
      clean = model.hidden(clean, pos, seg, layers=(0, j),
                           mask_Bx1xTxT=attention.attention_mask(seg, seg, blk, blk, True))
    h = model.hidden(jnp.concatenate([model.embed_tokens(x_t), clean], axis=1),
                     jnp.tile(pos, (1, 2)), jnp.tile(seg, (1, 2)),
                     mask_Bx1xTxT=training_mask(seg, size),
                     layers=(j, self.model_config.num_layers))
    return mdlm.subs_logits(model.logits(h[:, :t]))

  def _noise(self, rng_t, rng_mask, eligible, antithetic: bool, t_min: float, eps, clipped):
    """(masked (B, T), weight per token (B, T)) for one draw of per-block mask rates."""
    o = self.opts
    b, t = eligible.shape
    blocks = t // o.block_size
    tb = block_times(rng_t, b, blocks, antithetic, 0.0 if clipped else t_min)
    if clipped:   # linear rates uniform in [noise_min, noise_max], weight 1 / rate
      rate = o.noise_min + (o.noise_max - o.noise_min) * tb
      p, w = rate, 1.0 / rate
    else:
      p, w = mask_prob(_schedule(o), tb, eps), elbo_weight(_schedule(o), tb, eps)
    per_token = lambda v: jnp.repeat(v, o.block_size, axis=1)
    masked = eligible & (jax.random.uniform(rng_mask, eligible.shape) < per_token(p))
    return masked, per_token(w)

  def loss_sums(self, model, batch, rng):
    """sum over masked tokens of w(t_block) CE, over the row's scored tokens (`mdlm`'s:
    every real token but the first of its segment). With the clipped schedule this is
    BD3-LM's lower-variance training objective, not the bound; validation always reports
    the bound (`eval_sums`)."""
    o = self.opts
    keys = mdlm.loss_keys(rng)   # mdlm's keys: block_size = T draws mdlm's times and masks
    eligible = maskable(batch)
    masked, w = self._noise(keys["time"], keys["mask"], eligible,
                            o.time_sampling == "antithetic", o.t_min, None, self.clipped)
    x_t = jnp.where(masked, tokenizers.MASK, batch["inputs"])
    ce = jnp.where(masked, base.cross_entropy(self.noised_logits(model, batch, x_t),
                                              batch["inputs"]), 0.0)
    n_eligible = jnp.sum(eligible).astype(jnp.float32)
    n_masked = jnp.sum(masked).astype(jnp.float32)
    metrics = {"ce_masked": (jnp.sum(ce), n_masked), "mask_rate": (n_masked, n_eligible)}
    return jnp.sum(w * ce), n_eligible, metrics

  def bound_draws(self, model, batch, rng):
    """(K, B) draws of each row's NLL bound in nats (K = `eval_time_samples`), the token
    counts and the scored tokens: per block, mask rates over all of (0, 1] with eps = 0 and
    the schedule's own weight (never the clipped surrogate), so an exact model never scores
    below its NLL."""
    eligible = maskable(batch)

    def one(key):
      k_t, k_mask = jax.random.split(key)
      masked, w = self._noise(k_t, k_mask, eligible, True, 0.0, 0.0, False)
      x_t = jnp.where(masked, tokenizers.MASK, batch["inputs"])
      ce = base.cross_entropy(self.noised_logits(model, batch, x_t), batch["inputs"])
      return jnp.sum(jnp.where(masked, w * ce, 0.0), axis=1)

    keys = jax.random.split(rng, self.opts.eval_time_samples)
    return jax.lax.map(one, keys), jnp.sum(eligible, axis=1).astype(jnp.float32), eligible

  def eval_sums(self, model, batch, rng):
    draws, tokens, eligible = self.bound_draws(model, batch, rng)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": jnp.sum(jnp.mean(draws, axis=0)), "tokens": jnp.sum(tokens),
            "bytes": jnp.sum(token_bytes[batch["inputs"]] * eligible),
            **base.bound_error_sums(draws, tokens)}

  def flops_per_token(self, seq_len: int) -> float:
    """Forward + backward over the 2T positions, the unembedding on the noised half only,
    and attention over the pairs the mask allows: T (T + L') of them in all (noised block b
    reads L' + b L' keys, clean block b (b + 1) L'), so T + L' per training token, half of
    them the noised half's. With `noised_layers` k the clean half runs every layer and the
    noised half k of them."""
    cfg = self.model_config
    d = cfg.d_model
    layers = cfg.num_layers + (cfg.num_layers - self.noised_from)   # clean + noised
    blocks = layers * (4 * d * d + 3 * d * cfg.mlp_dim)
    attn = layers * d * (seq_len + self.opts.block_size)
    return 3.0 * 2.0 * (blocks + d * cfg.vocab_size + attn)

  def canvas_width(self, prompt_len: int, suffix_len: int, max_new_tokens: int) -> int:
    del suffix_len
    size = self.opts.block_size   # the prompt padded to whole blocks, then whole blocks
    return -(-prompt_len // size) * size + -(-max_new_tokens // size) * size

  def generate(self, model, prompt_BxP, rng, *, max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, sampler=None, steps=None, **options):
    """Block-by-block sampling after the prompt (see `bd3lm_sampling.generate`); returns
    (B, P + max_new_tokens), PAD after each row's first EOS."""
    return self.generate_blocks(model, prompt_BxP, rng, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       sampler=sampler, steps=steps, **options)[0]

  def generate_blocks(self, model, prompt_BxP, rng, *, sampler=None, steps=None, **options):
    """(tokens, info) of `bd3lm_sampling.generate`; info["calls"] counts network calls."""
    rule = self.resolve_sampler(sampler)
    return bd3lm_sampling.generate(model, prompt_BxP, rng, block_size=self.opts.block_size,
                                   rule=rule, steps=steps or self.opts.block_size,
                                   noised_from=self.noised_from, **options)


def _schedule(opts):
  """`mdlm_schedule`'s view of these options (no LLaDA, continuous time)."""
  return types.SimpleNamespace(schedule=opts.schedule, eps=opts.eps, llada=False,
                               discrete_steps=0)
