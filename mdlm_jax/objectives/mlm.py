"""`mlm`: BERT / ModernBERT masked language model (docs/objectives.md).

Each maskable token (a real token that is not a document's BOS) is selected with probability
`mask_rate` (ModernBERT 0.30, BERT 0.15); of the selected, 80% show MASK, 10% a uniform random
real token and 10% stay unchanged. The loss is the mean cross-entropy over the selected
positions; evaluation uses `eval_mask_rate` (0.15) with the evaluator's fixed seed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import mdlm as mdlm_lib


def corrupt(rng, inputs_BxT, eligible_BxT, rate: float, vocab: int):
  """Returns (model input, selected): 80/10/10 MASK / random / unchanged among selected."""
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  selected = eligible_BxT & (jax.random.uniform(k_sel, inputs_BxT.shape) < rate)
  kind = jax.random.uniform(k_kind, inputs_BxT.shape)
  noise = jax.random.randint(k_tok, inputs_BxT.shape, tokenizers.NUM_SPECIAL, vocab)
  x = jnp.where(selected & (kind < 0.8), tokenizers.MASK, inputs_BxT)
  x = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), noise, x)
  return x, selected


@objectives.register
class MLM(base.Objective):
  name = "mlm"
  causal = False
  defaults = dict(mask_rate=0.30, eval_mask_rate=0.15)

  @classmethod
  def validate(cls, opts):
    for key in ("mask_rate", "eval_mask_rate"):
      if not 0.0 < opts[key] <= 1.0:
        raise ValueError(f"objective.{key}={opts[key]} must be in (0, 1] "
                         "(ModernBERT trains at 0.30, BERT at 0.15).")

  def _ce(self, model, batch, rng, rate):
    eligible = mdlm_lib.maskable(batch)
    x, selected = corrupt(rng, batch["inputs"], eligible, rate, self.vocab_size)
    logits = model(x, batch["positions"], batch["segment_ids"])
    ce = base.cross_entropy(logits, batch["inputs"])
    return jnp.where(selected, ce, 0.0), selected

  def loss_sums(self, model, batch, rng):
    ce, selected = self._ce(model, batch, rng, self.opts.mask_rate)
    count = jnp.sum(selected).astype(jnp.float32)
    return jnp.sum(ce), count, {"selected": (count, float(selected.size))}

  def eval_sums(self, model, batch, rng):
    """Cross-entropy on the selected positions (not a likelihood of the sequence: the
    bits per byte it reports are the masked-token figure BERT papers quote)."""
    ce, selected = self._ce(model, batch, rng, self.opts.eval_mask_rate)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": jnp.sum(ce), "tokens": jnp.sum(selected).astype(jnp.float32),
            "bytes": jnp.sum(token_bytes[batch["inputs"]] * selected)}
