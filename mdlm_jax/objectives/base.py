"""What every objective provides. Batches are dicts of int32 (B, T) arrays: `inputs`,
`segment_ids` (0 = padding; packed documents are 1, 2, ...) and `positions`; prompt/answer
data (`sft_pairs`, `star_graph`) adds `prompt_mask` (1 on BOS and the prompt)."""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mdlm_jax import model as model_lib

Metrics = dict[str, jax.Array]


class Objective:
  name: ClassVar[str]
  defaults: ClassVar[dict[str, Any]] = {}
  causal: ClassVar[bool] = True
  accepts_suffix: ClassVar[bool] = False  # generate() takes suffix_BxS
  samplers: ClassVar[tuple[str, ...]] = ()  # names `tools/sample.py --sampler` accepts

  def __init__(self, config, tokenizer):
    self.config = config
    self.opts = config.objective
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self.model_config = model_lib.ModelConfig.from_config(config.model, self.vocab_size,
                                                          self.causal)

  @classmethod
  def validate(cls, opts) -> None:
    """Raises ValueError naming a bad `objective.` option."""

  @classmethod
  def train_transforms(cls, opts) -> tuple:
    """Grain random maps the pipeline applies to each tokenized training document
    ({'inputs': [BOS] text [EOS]}) before packing, in order (none by default)."""
    del opts
    return ()

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """The objective's modules; the trainer only sees their params."""
    return model_lib.Transformer(self.model_config, rngs)

  def loss_sums(self, model: nnx.Module, batch, rng):
    """(numerator, denominator, metrics) of the loss numerator / denominator over the batch.
    The denominator (a token, pair or document count) carries no gradient. A metric is a
    (sum, count) pair, reported as sum / count, or a plain array, reported as its total.
    Gradient accumulation adds all of these over microbatches and divides once, so the
    accumulated loss and gradient are the full batch's (`finish`)."""
    raise NotImplementedError

  def loss(self, model: nnx.Module, batch, rng) -> tuple[jax.Array, Metrics]:
    """The batch's loss and metrics: `loss_sums` divided out."""
    return finish(*self.loss_sums(model, batch, rng))

  def eval_sums(self, model: nnx.Module, batch, rng) -> Metrics:
    """Sums over a validation batch: `nll` (nats, or the objective's bound), `tokens`,
    `bytes`. The evaluator divides them out into per-token and per-byte figures."""
    raise NotImplementedError

  def generate(self, model: nnx.Module, prompt_BxP, rng, **options):
    """Samples continuations of `prompt_BxP` (int32, starting with BOS)."""
    raise ValueError(f"objective {self.name!r} has no sampler for a prompt.")

  def resolve_sampler(self, name: str | None) -> str | None:
    """The sampler `name` asks for (None: the objective's default), or ValueError naming the
    choices; None when the objective has a single sampler."""
    if name is None:
      return self.samplers[0] if self.samplers else None
    if name not in self.samplers:
      choices = ", ".join(self.samplers) or "none: it has one sampler"
      raise ValueError(f"--sampler={name!r} is unknown; objective {self.name!r} samples with "
                       f"{choices}.")
    return name

  def canvas_width(self, prompt_len: int, suffix_len: int, max_new_tokens: int) -> int:
    """The widest row `generate` reads for these lengths: it must fit model.max_seq_len."""
    del suffix_len
    return prompt_len + max_new_tokens

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the network calls the loss makes."""
    return 3.0 * forward_flops_per_token(self.model_config, seq_len)


def forward_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass per token. Causal attention does half the score work
  (only the lower triangle is needed); bidirectional attention is not halved."""
  d, f, layers = cfg.d_model, cfg.mlp_dim, cfg.num_layers
  dense = layers * (4 * d * d + 3 * d * f) + d * cfg.vocab_size
  attn = layers * 2 * seq_len * d * (0.5 if cfg.causal else 1.0)
  return 2.0 * (dense + attn)


def next_is_answer(batch):
  """(B, T) bool: the token after position t is not a prompt token (all True without a
  `prompt_mask`). Left-to-right objectives are trained and scored on these targets only: a
  prompt is given, never predicted (as in SFT and the star-graph task)."""
  if "prompt_mask" not in batch:
    return jnp.ones(batch["inputs"].shape, bool)
  return jnp.roll(batch["prompt_mask"], -1, axis=1) == 0


def cross_entropy(logits_BxTxV, targets_BxT):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)


def rank_in_row(score_BxT):
  """0 for the lowest score of each row, 1 for the next, ..."""
  return jnp.argsort(jnp.argsort(score_BxT, axis=1), axis=1)


def choose_count(rng, eligible_BxT, k_B):
  """min(k, n) of each row's n eligible positions, chosen uniformly at random."""
  u = jax.random.uniform(rng, eligible_BxT.shape)
  rank = rank_in_row(jnp.where(eligible_BxT, u, 2.0))
  return eligible_BxT & (rank < k_B.astype(jnp.int32)[:, None])


def finish(numerator, denominator, metrics):
  """(loss, metrics) from `Objective.loss_sums`' sums (of one batch or of all microbatches)."""
  div = lambda a, n: a / jnp.where(n == 0, 1.0, n)
  out = {k: div(*v) if isinstance(v, tuple) else v for k, v in metrics.items()}
  return div(numerator, jax.lax.stop_gradient(denominator)), out


def bound_error_sums(draws_KxB, tokens_B) -> dict[str, jax.Array]:
  """Sums for the two errors of a stochastic bound (`evaluate.summarize`), from K independent
  draws per row of a batch whose rows share randomness within a draw (antithetic times):
  `mc_var`, the variance of the batch's summed estimate, sample variance of the K per-draw
  batch totals / K (the rows' correlation is inside each total), so it falls as 1/K; and the
  row sums for the spread between rows of the ratio sum(nll) / sum(tokens)."""
  k = draws_KxB.shape[0]
  out = {}
  if k >= 2:
    totals = jnp.sum(draws_KxB, axis=1)
    out["mc_var"] = jnp.var(totals, ddof=1) / k
  nll = jnp.mean(draws_KxB, axis=0)
  out.update(rows=jnp.sum(tokens_B > 0).astype(jnp.float32), nll_sq=jnp.sum(nll ** 2),
             nll_tokens=jnp.sum(nll * tokens_B), tokens_sq=jnp.sum(tokens_B ** 2))
  return out


def masked_sum(x, mask):
  """(sum of x over mask, the mask's count), a ratio for `loss_sums`."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask), jnp.sum(mask)


def masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
