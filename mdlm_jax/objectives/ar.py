"""`ar`: next-token prediction, with MEAP input masking and z-loss (docs/objectives.md),
on the answer tokens only when rows are prompt/answer pairs, and fill-in-the-middle training
(`fim_rate`: the data pipeline turns that share of documents into
prefix-suffix-middle order with sentinel tokens, Bavarian et al. 2022)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import objectives
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base


def next_token_targets(batch):
  """targets[t] = inputs[t + 1] where t + 1 lies in the same (real) segment."""
  x, seg = batch["inputs"], batch["segment_ids"]
  targets = jnp.roll(x, -1, axis=1)
  next_seg = jnp.roll(seg, -1, axis=1).at[:, -1].set(-1)
  return targets, (seg > 0) & (next_seg == seg)


def meap_mask(inputs_BxT, eligible_BxT, ratio: float, rng):
  """Replaces floor(ratio * n) of the eligible input positions of each row with MASK, where
  n is the row's eligible count; ineligible positions (padding, the last of each segment)
  are never masked. Returns (masked inputs, boolean mask)."""
  n = jnp.sum(eligible_BxT, axis=1)
  masked = base.choose_count(rng, eligible_BxT, jnp.floor(ratio * n.astype(jnp.float32)))
  return jnp.where(masked, tokenizers.MASK, inputs_BxT), masked


@objectives.register
class AR(base.Objective):
  name = "ar"
  defaults = dict(meap_mask_ratio=0.0, z_loss=0.0, fim_rate=0.0)
  causal = True

  @property
  def accepts_suffix(self) -> bool:
    """Fill-in-the-middle needs a model trained on prefix-suffix-middle documents."""
    return self.opts.fim_rate > 0

  @classmethod
  def validate(cls, opts):
    if not 0.0 <= opts.meap_mask_ratio < 1.0:
      raise ValueError(f"objective.meap_mask_ratio={opts.meap_mask_ratio} must be in [0, 1) "
                       "(0 disables MEAP; the paper uses 0.15).")
    if not 0.0 <= opts.fim_rate <= 1.0:
      raise ValueError(f"objective.fim_rate={opts.fim_rate} must be in [0, 1] (the share of "
                       "training documents turned into prefix-suffix-middle; 0.5 is usual).")
    if opts.z_loss < 0:
      raise ValueError(f"objective.z_loss={opts.z_loss} must be >= 0 (0 disables; 1e-4 is usual).")

  @classmethod
  def train_transforms(cls, opts) -> tuple:
    from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return (pipeline.Fim(opts.fim_rate),) if opts.fim_rate > 0 else ()

  def _nll(self, model, batch, inputs):
    targets, valid = next_token_targets(batch)
    valid = valid & base.next_is_answer(batch)
    logits = model(inputs, batch["positions"], batch["segment_ids"])
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll, lse, targets, valid

  def loss_sums(self, model, batch, rng):
    inputs = batch["inputs"]
    if self.opts.meap_mask_ratio > 0:
      _, eligible = next_token_targets(batch)
      inputs, _ = meap_mask(inputs, eligible, self.opts.meap_mask_ratio, rng)
    nll, lse, _, valid = self._nll(model, batch, inputs)
    ce, count = base.masked_sum(nll, valid)
    metrics = {"ce": (ce, count)}
    total = ce
    if self.opts.z_loss > 0:
      z, _ = base.masked_sum(lse ** 2, valid)
      total = total + self.opts.z_loss * z
      metrics["z_loss"] = (z, count)
    return total, count, metrics

  def eval_sums(self, model, batch, rng):
    del rng  # inference sees no MEAP masking
    nll, _, targets, valid = self._nll(model, batch, batch["inputs"])
    v = valid.astype(jnp.float32)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": jnp.sum(nll * v), "tokens": jnp.sum(v),
            "bytes": jnp.sum(token_bytes[targets] * v)}

  def canvas_width(self, prompt_len: int, suffix_len: int, max_new_tokens: int) -> int:
    # with a suffix: the prompt [BOS, <fim_prefix>, prefix, <fim_suffix>, suffix, <fim_middle>]
    return prompt_len + max_new_tokens + (suffix_len + 3 if suffix_len else 0)

  def generate(self, model, prompt_BxP, rng, *, max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, suffix_BxS=None):
    """Continues the prompt; with `suffix_BxS` (FIM-trained models) generates the middle from
    the prompt [BOS, <fim_prefix>, prefix, <fim_suffix>, suffix, <fim_middle>] and returns
    (B, P + max_new_tokens): the prompt, then the middle (EOS ends it)."""
    if suffix_BxS is None:
      return sampling.generate_ar(model, prompt_BxP, rng, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    b = prompt_BxP.shape[0]
    sentinel = lambda t: jnp.full((b, 1), t, jnp.int32)
    psm = jnp.concatenate([prompt_BxP[:, :1], sentinel(tokenizers.FIM_PREFIX), prompt_BxP[:, 1:],
                           sentinel(tokenizers.FIM_SUFFIX), suffix_BxS.astype(jnp.int32),
                           sentinel(tokenizers.FIM_MIDDLE)], axis=1)
    out = sampling.generate_ar(model, psm, rng, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jnp.concatenate([prompt_BxP, out[:, psm.shape[1]:]], axis=1)
