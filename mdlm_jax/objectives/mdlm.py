"""`mdlm`: masked diffusion (MDLM / MD4 / LLaDA, MaskGIT-style options).

Semantics: docs/objectives.md. The schedules and weights are in `mdlm_schedule.py`, the
samplers in `mdlm_sampling.py`; this module holds the network, the losses and the bounds.

Forward process: every maskable token is replaced by MASK with probability 1 - alpha(t).
The schedule is written through its mask fraction m(t) (linear t, cosine cos(pi/2 (1 - t)),
poly{K} t^K) as 1 - alpha(t) = (1 - eps) m(t), so the continuous-time ELBO weight
-alpha'(t) / (1 - alpha(t)) = m'(t) / m(t) is positive and free of eps (linear: 1/t).

Maskable tokens are the real tokens of each packed segment except its first (a document's BOS,
or the first token of a row that continues a document), the same tokens the autoregressive
baseline predicts, so the bound per token (and per byte) is comparable with its NLL. The network never predicts MASK (SUBS) and unmasked positions carry over their input:
only masked positions enter the loss.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mdlm_jax import model as model_lib
from mdlm_jax import objectives
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import mdlm_likelihood as likelihood
from mdlm_jax.objectives import mdlm_sampling
from mdlm_jax.objectives.mdlm_schedule import choose_masked
from mdlm_jax.objectives.mdlm_schedule import elbo_weight
from mdlm_jax.objectives.mdlm_schedule import mask_fraction  # noqa: F401
from mdlm_jax.objectives.mdlm_schedule import mask_prob
from mdlm_jax.objectives.mdlm_schedule import maskable
from mdlm_jax.objectives.mdlm_schedule import parse_schedule
from mdlm_jax.objectives.mdlm_schedule import sample_times


def loss_keys(rng) -> dict[str, jax.Array]:
  """The keys one training loss draws from, by use."""
  return dict(zip(("crop", "time", "mask", "augment", "self_condition", "critic"),
                  jax.random.split(rng, 6)))


def augment(rng, inputs_BxT, masked_BxT, no_replace: float, random_token: float, vocab: int):
  """MaskGIT / BERT augmentation inside the masked set: with a coin flip per step, a
  `no_replace` fraction of masked positions keeps its token; with another, a `random_token`
  fraction gets a uniform random real token; the rest shows MASK. Returns the model input."""
  k_coin, k_u, k_tok = jax.random.split(rng, 3)
  coins = jax.random.bernoulli(k_coin, 0.5, (2,))
  u = jax.random.uniform(k_u, inputs_BxT.shape)
  keep = masked_BxT & coins[0] & (u < no_replace)
  rand = masked_BxT & coins[1] & (u >= 1.0 - random_token)
  noise = jax.random.randint(k_tok, inputs_BxT.shape, tokenizers.NUM_SPECIAL, vocab)
  x = jnp.where(masked_BxT, tokenizers.MASK, inputs_BxT)
  x = jnp.where(keep, inputs_BxT, x)
  return jnp.where(rand, noise, x)


def subs_logits(logits_BxTxV):
  """SUBS: MASK is never predicted."""
  return logits_BxTxV.at[..., tokenizers.MASK].set(sampling.NEG_INF)


def critic_targets(rng, inputs_BxT, masked_BxT, logits_BxTxV):
  """The critic's input and labels: masked positions filled by the generator at a random
  temperature in [0, 1) (Gumbel-max, no gradient); label = the filled sequence differs from
  the original there (never at positions that were not masked)."""
  k_temp, k_noise = jax.random.split(rng)
  temperature = jax.random.uniform(k_temp, ())
  noisy = jax.lax.stop_gradient(logits_BxTxV) + temperature * sampling.gumbel(
      k_noise, logits_BxTxV.shape)
  x_gen = jnp.where(masked_BxT, jnp.argmax(noisy, axis=-1).astype(jnp.int32), inputs_BxT)
  return x_gen, x_gen != inputs_BxT


def crop(rng, batch, prob: float):
  """LLaDA: with probability `prob` the whole batch is cut to a random length in [1, T]
  (positions beyond it become padding, so they are neither attended to nor scored)."""
  k_coin, k_len = jax.random.split(rng)
  t = batch["inputs"].shape[1]
  cut = jax.random.randint(k_len, (), 1, t + 1)
  length = jnp.where(jax.random.bernoulli(k_coin, prob), cut, t)
  keep = jnp.arange(t)[None, :] < length
  return dict(batch, segment_ids=jnp.where(keep, batch["segment_ids"], 0))


class Losses(NamedTuple):
  loss: jax.Array             # generator_loss + critic_weight * critic_loss
  generator_loss: jax.Array
  critic_loss: jax.Array      # 0 without a critic


class DiffusionNet(nnx.Module):
  """The backbone with the MaskGIT extras: self-conditioning (the previous pass's final states,
  projected d -> d without bias and added to the input embeddings, or a learned null
  embedding), a token critic (a head on the final states of the backbone run on the
  generated sequence, `self`, or of a separate network, `separate`) and time conditioning
  (sinusoidal features of t through a two-layer SiLU MLP, added to every input embedding)."""

  def __init__(self, cfg: model_lib.ModelConfig, self_condition: bool, critic: str,
               rngs: nnx.Rngs, time_condition: bool = False):
    d = cfg.d_model
    self.backbone = model_lib.Transformer(cfg, rngs)
    self.self_condition = self_condition
    self.critic_kind = critic
    self.time_condition = time_condition
    if time_condition:
      self.t_w1 = model_lib.param(rngs, (d, d), ("embed", "mlp"), cfg.init_std)
      self.t_w2 = model_lib.param(rngs, (d, d), ("mlp", "embed"), cfg.init_std)
    if self_condition:
      self.sc_proj = model_lib.param(rngs, (d, d), ("embed", "mlp"), cfg.init_std)
      self.sc_null = model_lib.param(rngs, (d,), ("embed",), cfg.init_std)
    if critic == "separate":
      self.critic_net = model_lib.Transformer(cfg, rngs)
    if critic != "none":
      self.critic_w = model_lib.param(rngs, (d,), ("embed",), cfg.init_std)

  def null_condition(self, shape):
    return jnp.broadcast_to(self.sc_null[...], tuple(shape) + self.sc_null.shape)

  def time_embedding(self, t_B):
    d = self.t_w1.shape[0]
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(d // 2, dtype=jnp.float32) / (d // 2))
    angle = 1000.0 * t_B.astype(jnp.float32)[:, None] * freq
    feats = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    return model_lib.dense(jax.nn.silu(model_lib.dense(feats, self.t_w1[...])), self.t_w2[...])

  def run(self, x_BxT, positions, segment_ids, cond_BxTxD=None, t_B=None):
    """(float32 logits (B, T, V), final states (B, T, D)); t_B is used when time-conditioned
    (None: t = 0, a fully visible sequence)."""
    e = self.backbone.embed_tokens(x_BxT)
    if self.time_condition:
      t_B = jnp.zeros(x_BxT.shape[:1], jnp.float32) if t_B is None else t_B
      t_emb = self.time_embedding(jnp.broadcast_to(t_B, x_BxT.shape[:1]))
      e = e + t_emb[:, None].astype(e.dtype)
    if self.self_condition:
      c = self.null_condition(x_BxT.shape) if cond_BxTxD is None else cond_BxTxD
      e = e + model_lib.dense(c.astype(e.dtype), self.sc_proj[...])
    h = self.backbone.hidden(e, positions, segment_ids)
    return self.backbone.logits(h), h

  def __call__(self, x_BxT, positions, segment_ids):
    return self.run(x_BxT, positions, segment_ids)[0]

  def critic(self, x_BxT, positions, segment_ids):
    """One logit per position: 'this token differs from the original'."""
    if self.critic_kind == "separate":
      net = self.critic_net
      h = net.hidden(net.embed_tokens(x_BxT), positions, segment_ids)
    else:
      h = self.run(x_BxT, positions, segment_ids)[1]
    return model_lib.dense(h.astype(jnp.float32), self.critic_w[...][:, None])[..., 0]


@objectives.register
class MDLM(base.Objective):
  name = "mdlm"
  causal = False
  samplers = tuple(mdlm_sampling.SAMPLERS)
  defaults = dict(
      schedule="linear",       # linear | cosine | poly{K}
      eps=1e-3,                # 1 - alpha(t) = (1 - eps) m(t); LLaDA: eps + (1 - eps) t
      t_min=1e-3,              # training times lie in (t_min, 1]
      weighting="elbo",        # elbo: w(t) sum of masked CE / tokens | none: mean masked CE
      discrete_steps=0,        # T > 0: the discrete-time ELBO with T steps
      time_sampling="antithetic",  # antithetic | iid
      time_conditioning=False,  # the network sees t (the optimal denoiser does not need it)
      masking="bernoulli",     # bernoulli | exact (ceil(max(m n, 1)) tokens per row)
      llada=False,             # LLaDA pre-training: mask prob eps + (1 - eps) t, weight 1/p
      crop_prob=0.0,           # LLaDA uses 0.01: random-length crops of the batch
      no_replace_prob=0.0,     # MaskGIT / BERT augmentation (0.15 and 0.10 in MaskGIT)
      random_token_prob=0.0,
      eval_time_samples=2,     # K >= 2 time samples per sequence: the bound and its MC error
      self_condition_prob=0.0,  # MaskGIT uses 0.75
      critic="none",           # none | self | separate: token critic
      critic_weight=1.0,
      sft=False,               # LLaDA SFT on prompt/answer rows (data.name=sft_pairs)
  )

  @classmethod
  def validate(cls, opts):
    parse_schedule(opts.schedule)
    checks = [
        (0.0 <= opts.eps < 1.0, f"objective.eps={opts.eps} must be in [0, 1)."),
        (0.0 <= opts.t_min < 1.0, f"objective.t_min={opts.t_min} must be in [0, 1)."),
        (opts.weighting in ("elbo", "none"),
         f"objective.weighting={opts.weighting!r} must be 'elbo' or 'none'."),
        (opts.discrete_steps >= 0, f"objective.discrete_steps={opts.discrete_steps} must be "
                                   ">= 0 (0: continuous time)."),
        (opts.time_sampling in ("antithetic", "iid"),
         f"objective.time_sampling={opts.time_sampling!r} must be 'antithetic' or 'iid'."),
        (opts.masking in ("bernoulli", "exact"),
         f"objective.masking={opts.masking!r} must be 'bernoulli' or 'exact'."),
        (not opts.llada or opts.schedule == "linear",
         f"objective.llada=True uses the linear schedule; got objective.schedule="
         f"{opts.schedule!r}."),
        (not opts.llada or not opts.discrete_steps,
         f"objective.llada=True trains the continuous-time bound (weight 1/p); set "
         f"objective.discrete_steps=0 (got {opts.discrete_steps}) or objective.llada=False."),
        (0.0 <= opts.crop_prob <= 1.0, f"objective.crop_prob={opts.crop_prob} must be in [0, 1]."),
        (0.0 <= opts.no_replace_prob and 0.0 <= opts.random_token_prob
         and opts.no_replace_prob + opts.random_token_prob <= 1.0,
         "objective.no_replace_prob and objective.random_token_prob must be >= 0 and sum "
         "to at most 1."),
        (opts.eval_time_samples >= 1,
         f"objective.eval_time_samples={opts.eval_time_samples} must be >= 1."),
        (0.0 <= opts.self_condition_prob <= 1.0,
         f"objective.self_condition_prob={opts.self_condition_prob} must be in [0, 1]."),
        (opts.critic in ("none", "self", "separate"),
         f"objective.critic={opts.critic!r} must be 'none', 'self' or 'separate'."),
        (opts.critic_weight >= 0, f"objective.critic_weight={opts.critic_weight} must be >= 0."),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  @property
  def self_conditioned(self) -> bool:
    return self.opts.self_condition_prob > 0

  @property
  def time_conditioned(self) -> bool:
    return bool(self.opts.time_conditioning)

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    if self.self_conditioned or self.opts.critic != "none" or self.time_conditioned:
      return DiffusionNet(self.model_config, self.self_conditioned, self.opts.critic, rngs,
                          self.time_conditioned)
    return model_lib.Transformer(self.model_config, rngs)

  def apply(self, model, x_BxT, positions, segment_ids, cond=None, t_B=None):
    """(SUBS logits, final states or None); `cond` the self-conditioning input (None: null),
    `t_B` the time of each row (read only by a time-conditioned model)."""
    if isinstance(model, DiffusionNet):
      logits, h = model.run(x_BxT, positions, segment_ids, cond, t_B)
      return subs_logits(logits), h
    return subs_logits(model(x_BxT, positions, segment_ids)), None

  def masked_ce(self, model, batch, x_t, masked, cond=None, t_B=None):
    logits, _ = self.apply(model, x_t, batch["positions"], batch["segment_ids"], cond, t_B)
    ce = base.cross_entropy(logits, batch["inputs"])
    return jnp.where(masked, ce, 0.0), logits

  def loss_sums(self, model, batch, rng):
    sums, metrics = self.loss_terms(model, batch, rng)
    num, den = sums["generator"]
    critic, n_eligible = sums["critic"]
    # The ELBO's denominator is the eligible count, which the critic shares; the plain mean
    # (weighting='none') and SFT's per-row mean have their own, onto which the critic's share
    # of this batch is put.
    scale = 1.0 if self._critic_shares_denominator else den / jnp.where(n_eligible == 0, 1.0,
                                                                         n_eligible)
    metrics = dict(metrics, generator_loss=(num, den), critic_loss=(critic, n_eligible))
    return num + self.opts.critic_weight * critic * scale, den, metrics

  @property
  def _critic_shares_denominator(self) -> bool:
    return self.opts.weighting != "none" and not self.opts.sft

  def losses(self, model, batch, rng) -> tuple[Losses, dict]:
    """(Losses(loss, generator_loss, critic_loss), metrics) of one batch."""
    sums, metrics = self.loss_terms(model, batch, rng)
    (num, den), (critic, n_eligible) = sums["generator"], sums["critic"]
    div = lambda a, n: a / jnp.maximum(n, 1)
    gen_loss, critic_loss = div(num, den), div(critic, n_eligible)
    metrics = {k: div(*v) for k, v in metrics.items()}
    return Losses(gen_loss + self.opts.critic_weight * critic_loss, gen_loss, critic_loss), metrics

  def maskable(self, batch):
    """What may be masked: every token but a document's BOS; with `sft`, the answer only."""
    if not self.opts.sft:
      return maskable(batch)
    if "prompt_mask" not in batch:
      raise ValueError("objective.sft=True trains on prompt/answer rows: set "
                       "data.name=sft_pairs and data.files to .jsonl files with 'prompt' and "
                       "'answer' fields.")
    return maskable(batch) & (batch["prompt_mask"] == 0)

  def loss_terms(self, model, batch, rng):
    """({'generator': (sum, count), 'critic': (sum, count)}, metrics as (sum, count))."""
    o = self.opts
    keys = loss_keys(rng)
    k_crop, k_t, k_mask, k_aug, k_sc, k_critic = (keys[k] for k in (
        "crop", "time", "mask", "augment", "self_condition", "critic"))
    if o.crop_prob > 0:
      batch = crop(k_crop, batch, o.crop_prob)
    eligible = self.maskable(batch)
    b = eligible.shape[0]
    t = sample_times(k_t, b, o.time_sampling == "antithetic", o.t_min, o.discrete_steps)
    masked = choose_masked(k_mask, eligible, mask_prob(o, t), o.masking == "exact")
    if o.no_replace_prob > 0 or o.random_token_prob > 0:
      x_t = augment(k_aug, batch["inputs"], masked, o.no_replace_prob, o.random_token_prob,
                    self.vocab_size)
    else:
      x_t = jnp.where(masked, tokenizers.MASK, batch["inputs"])
    pos, seg = batch["positions"], batch["segment_ids"]
    cond = None
    if self.self_conditioned:  # a first pass without gradient, or the null embedding
      cond = jax.lax.cond(
          jax.random.bernoulli(k_sc, o.self_condition_prob),
          lambda: jax.lax.stop_gradient(model.run(x_t, pos, seg, None, t)[1]).astype(
              jnp.float32),
          lambda: model.null_condition(x_t.shape).astype(jnp.float32))
    ce, logits = self.masked_ce(model, batch, x_t, masked, cond, t)
    n_eligible = jnp.sum(eligible).astype(jnp.float32)
    n_masked = jnp.sum(masked).astype(jnp.float32)
    if o.weighting == "none":
      gen = (jnp.sum(ce), n_masked)
    else:
      w = 1.0 / mask_prob(o, t) if o.llada else elbo_weight(o, t)
      if o.sft:  # per row: divided by the answer length (its EOS padding included)
        rows = jnp.sum(eligible, axis=1)
        per_row = jnp.sum(w[:, None] * ce, axis=1) / jnp.maximum(rows, 1)
        gen = (jnp.sum(per_row), jnp.sum(rows > 0).astype(jnp.float32))
      else:
        gen = (jnp.sum(w[:, None] * ce), n_eligible)
    critic = jnp.zeros((), jnp.float32)
    if o.critic != "none":
      x_gen, labels = critic_targets(k_critic, batch["inputs"], masked, logits)
      bce = optax.sigmoid_binary_cross_entropy(model.critic(x_gen, pos, seg),
                                               labels.astype(jnp.float32))
      critic = jnp.sum(jnp.where(eligible, bce, 0.0))
    metrics = {"ce_masked": (jnp.sum(ce), n_masked), "mask_rate": (n_masked, n_eligible)}
    return {"generator": gen, "critic": (critic, n_eligible)}, metrics

  def row_bounds(self, model, batch, rng):
    """Per row: the NLL bound in nats averaged over `eval_time_samples` draws (`bound_draws`),
    its token count and the scored tokens."""
    draws, tokens, eligible = self.bound_draws(model, batch, rng)
    return jnp.mean(draws, axis=0), tokens, eligible

  def bound_draws(self, model, batch, rng):
    """(K, B) draws of each row's NLL bound, the token counts and the scored tokens (see
    `mdlm_likelihood.bound_draws`)."""
    return likelihood.bound_draws(self, model, batch, rng)

  def conditional_bound(self, model, batch, rng, samples: int):
    """LLaDA's bound on -log p(answer | prompt) (see `mdlm_likelihood.conditional_bound`)."""
    return likelihood.conditional_bound(self, model, batch, rng, samples)

  def eval_sums(self, model, batch, rng):
    draws, tokens, eligible = self.bound_draws(model, batch, rng)
    nll = jnp.mean(draws, axis=0)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": jnp.sum(nll), "tokens": jnp.sum(tokens),
            "bytes": jnp.sum(token_bytes[batch["inputs"]] * eligible),
            **base.bound_error_sums(draws, tokens)}

  def flops_per_token(self, seq_len: int) -> float:
    """Forward + backward of the denoiser, the expected self-conditioning first pass
    (forward only) and the critic's forward + backward."""
    f = base.forward_flops_per_token(self.model_config, seq_len)
    return f * (3.0 + self.opts.self_condition_prob + 3.0 * (self.opts.critic != "none"))

  def generate(self, model, prompt_BxP, rng, *, max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, sampler="ancestral", steps=None, **options):
    """Fills `max_new_tokens` MASKs after the prompt (see `sample` for infilling anywhere)."""
    b, p = prompt_BxP.shape
    canvas = jnp.concatenate(
        [prompt_BxP, jnp.full((b, max_new_tokens), tokenizers.MASK, jnp.int32)], axis=1)
    return self.sample(model, canvas, rng, sampler=sampler, steps=steps or max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       **options)[0]

  def sample(self, model, canvas_BxT, rng, *, sampler="ancestral", steps=128, **options):
    """Replaces every MASK of `canvas_BxT` (one document per row); other tokens never change.
    Returns (tokens, info) with info["calls"], the number of network evaluations."""
    return mdlm_sampling.run(sampler, self, model, canvas_BxT, rng, steps=steps, **options)
