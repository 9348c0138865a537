"""Validation likelihood: the objective's NLL (or bound) per token, bits per token and per byte."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdlm_jax import sharding
from mdlm_jax import tokenizers
from mdlm_jax.data import pipeline


def summarize(sums: dict[str, float], prefix: str = "eval/") -> dict[str, float]:
  """Per-token and per-byte figures from summed batches. For a stochastic bound:
  `loss_stderr` is its Monte-Carlo error (given the data; from `mc_var`, needs K >= 2 draws),
  `loss_between_rows_stderr` the standard error from the spread between the rows scored
  (what another sample of documents would change)."""
  tokens, nbytes = max(sums["tokens"], 1.0), max(sums["bytes"], 1.0)
  nll = sums["nll"] / tokens
  out = {f"{prefix}loss": nll, f"{prefix}bits_per_token": nll / math.log(2),
         f"{prefix}bits_per_byte": sums["nll"] / math.log(2) / nbytes,
         f"{prefix}perplexity": math.exp(min(nll, 50.0)), f"{prefix}tokens": sums["tokens"]}
  to_bpb = tokens / math.log(2) / nbytes
  if "mc_var" in sums:
    se = math.sqrt(max(sums["mc_var"], 0.0)) / tokens
    out[f"{prefix}loss_stderr"] = se
    out[f"{prefix}bits_per_byte_stderr"] = se * to_bpb
  rows = sums.get("rows", 0.0)
  if rows > 1:  # the ratio sum(r) / sum(n) over rows: sqrt(sum (r_i - nll n_i)^2 R/(R-1)) / sum(n)
    var = sums["nll_sq"] - 2 * nll * sums["nll_tokens"] + nll ** 2 * sums["tokens_sq"]
    se = math.sqrt(max(var, 0.0) * rows / (rows - 1)) / tokens
    out[f"{prefix}loss_between_rows_stderr"] = se
    out[f"{prefix}bits_per_byte_between_rows_stderr"] = se * to_bpb
  return out


def format_line(step: int, r: dict[str, float]) -> str:
  pm = lambda key: f" ± {r[key]:.4f}" if key in r else ""
  rows = r.get("eval/loss_between_rows_stderr")
  spread = (f" (± Monte-Carlo error; between rows ± {rows:.4f})" if rows is not None
            and "eval/loss_stderr" in r else "")
  return (f"eval @ step {step}: loss {r['eval/loss']:.4f}{pm('eval/loss_stderr')}{spread} | "
          f"bits/token {r['eval/bits_per_token']:.4f} | bits/byte {r['eval/bits_per_byte']:.4f}"
          f"{pm('eval/bits_per_byte_stderr')} | {int(r['eval/tokens'])} tokens")


def make_sampler(setup, max_new_tokens: int, temperature: float = 0.8):
  """A jitted unconditional sampler `(params, rng) -> text` for the periodic sample shown
  during training, or None when the objective has no prompt sampler."""
  objective, graphdef = setup.objective, setup.graphdef
  prompt = jnp.full((1, 1), tokenizers.BOS, jnp.int32)

  def fn(params, rng):
    return objective.generate(nnx.merge(graphdef, params), prompt, rng,
                              max_new_tokens=max_new_tokens, temperature=temperature)

  if max_new_tokens < 1:
    return None
  try:
    jax.eval_shape(fn, setup.abstract_params, jax.random.key(0))
  except ValueError:
    return None
  jitted = jax.jit(fn)

  def sample(params, rng) -> str:
    ids = np.asarray(jax.device_get(jitted(params, rng)))[0, 1:]
    return setup.tokenizer.decode_until_eos(ids)
  return sample


class Evaluator:
  """Runs `objective.eval_sums` over the validation split with a fixed seed."""

  def __init__(self, setup, split: str = "validation", seed_offset: int = 1):
    self.setup = setup
    self.split = split
    objective, graphdef = setup.objective, setup.graphdef
    self.key = jax.random.key(setup.config.seed + seed_offset)

    def fn(params, batch, rng):
      return objective.eval_sums(nnx.merge(graphdef, params), batch, rng)

    self._step = jax.jit(fn, in_shardings=(setup.param_shardings, setup.batch_sharding, None),
                         out_shardings=sharding.replicated(setup.mesh))

  def run(self, params, max_batches: int, progress=None,
          every_s: float = 10.0) -> dict[str, float]:
    """max_batches < 0 reads the whole split. Processes stay in lockstep: a process whose
    shard ran out feeds all-padding batches until every process is done or the limit is hit.
    `progress(line)` hears how far it got every `every_s` seconds (tools/evaluate.py)."""
    import time  # pylint: disable=g-import-not-at-top
    start = last_told = time.time()
    cfg = self.setup.config
    it = iter(pipeline.eval_dataset(cfg, self.setup.tokenizer, self.split))
    local_b = pipeline.local_batch_size(cfg.train.batch_size)
    total, i, done = None, 0, False
    while max_batches < 0 or i < max_batches:
      try:
        local = next(it) if not done else None
      except StopIteration:
        done = True
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        all_done = bool(np.all(multihost_utils.process_allgather(np.array([done]))))
      else:
        all_done = done
      if all_done:
        break
      if done:
        local = pipeline.empty_batch(local_b, cfg.data.seq_len, pipeline.batch_keys(cfg.data))
      sums = self._step(params, pipeline.to_global(local, self.setup.batch_sharding),
                        jax.random.fold_in(self.key, i))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
      i += 1
      if progress is not None and time.time() - last_told >= every_s:
        last_told = time.time()
        of = f"/{max_batches}" if max_batches >= 0 else ""
        progress(f"evaluating {self.split}: batch {i}{of}, "
                 f"{int(jax.device_get(total['tokens']))} tokens, {last_told - start:.0f} s")
    if total is None:
      raise ValueError(f"the {self.split} split yielded no batch to evaluate.")
    return summarize({k: float(v) for k, v in jax.device_get(total).items()})
