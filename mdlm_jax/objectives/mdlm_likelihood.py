"""The `mdlm` likelihood: Monte-Carlo draws of the ELBO with eps = 0 (the validation upper
bound) and LLaDA's conditional bound of an answer given its prompt."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives.mdlm_schedule import choose_masked
from mdlm_jax.objectives.mdlm_schedule import elbo_weight
from mdlm_jax.objectives.mdlm_schedule import mask_prob
from mdlm_jax.objectives.mdlm_schedule import maskable
from mdlm_jax.objectives.mdlm_schedule import sample_times


def bound_draws(objective, model, batch, rng):
  """(K, B) draws of each row's NLL bound in nats, K = `eval_time_samples`, the token counts
  (B,) and the scored tokens. Each draw is the ELBO with Bernoulli masking, the schedule's
  own weight and one antithetic set of times across the batch over all of (0, 1], with
  eps = 0: alpha(0) = 1 and alpha(1) = 0, so no prior or reconstruction term is left out
  and an exact model never scores below its NLL. Draws are independent of each other.
  With `sft`: the conditional bound of the answer given the prompt (`conditional_bound`)."""
  o = objective.opts
  if o.sft:
    return conditional_bound(objective, model, batch, rng, o.eval_time_samples)
  eligible = maskable(batch)
  b = eligible.shape[0]

  def one(key):
    k_t, k_mask = jax.random.split(key)
    t = sample_times(k_t, b, True, 0.0, o.discrete_steps)
    masked = choose_masked(k_mask, eligible, mask_prob(o, t, eps=0.0), exact=False)
    ce, _ = objective.masked_ce(model, batch,
                            jnp.where(masked, tokenizers.MASK, batch["inputs"]), masked, t_B=t)
    return elbo_weight(o, t, eps=0.0) * jnp.sum(ce, axis=1)

  keys = jax.random.split(rng, o.eval_time_samples)
  return jax.lax.map(one, keys), jnp.sum(eligible, axis=1).astype(jnp.float32), eligible

def conditional_bound(objective, model, batch, rng, samples: int):
  """LLaDA's estimate of -log p(answer | prompt) <= E_l [(L / l) sum over l masked answer
  tokens of their CE], with exactly l of the L answer tokens masked uniformly at random and
  l stratified over 1..L across the `samples` draws (one shared offset, so treating the
  draws as independent overstates their Monte-Carlo error). Returns ((K, B) draws, L,
  answer)."""
  answer = objective.maskable(batch)
  n = jnp.sum(answer, axis=1)
  nf = n.astype(jnp.float32)
  u = jax.random.uniform(jax.random.fold_in(rng, 1), ())

  def one(k):
    l = jnp.clip(jnp.floor((k + u) / samples * nf) + 1, 1, jnp.maximum(nf, 1))
    masked = base.choose_count(jax.random.fold_in(rng, k + 2), answer, l)
    ce, _ = objective.masked_ce(model, batch, jnp.where(masked, tokenizers.MASK, batch["inputs"]),
                            masked, t_B=l / jnp.maximum(nf, 1))
    return nf / l * jnp.sum(ce, axis=1)

  draws = jax.lax.map(one, jnp.arange(samples))
  return jnp.where(n > 0, draws, 0.0), nf, answer
