"""Generation tasks that score a trained model: star-graph path finding and infilling; and the
evaluation hooks the trainer runs at each evaluation without knowing them (`eval_hooks`).

- `star_graph_accuracy`: the prompt is a validation problem up to '=' (edges, start, goal); the
  model writes the path greedily; a problem counts when the whole path is right.
- `infill_scores`: spans cut from held-out documents: prefix, a middle of `span` tokens, suffix;
  the model fills the middle greedily; exact match (the whole span) and per-token (for byte
  tokens, per-character) accuracy.

Each objective fills a middle its own way (`fill_middle`): `ar` continues the prompt (with a
suffix only when trained with FIM: prefix-suffix-middle prompt), `bst` decodes forward towards
the suffix encoded by its backward decoder, `mdlm` unmasks the span with a sampler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mdlm_jax import evaluate
from mdlm_jax import tokenizers
from mdlm_jax.data import builders
from mdlm_jax.data import star_graph

# Evaluation hooks. A maker `(setup) -> hook or None` is registered with `@eval_hook`; a hook
# `(params, step) -> (scalars, texts, line)` runs at every evaluation of a training run: its
# scalars go to the metrics and TensorBoard, its texts ({tag: text}) to TensorBoard, its line
# to the console. A maker returns None when its task does not apply to the run, and raises
# ValueError for settings it cannot run with (before the run writes anything). Settings a
# hook reads are declared with it (`options`, under `eval.`; config.finalize adds them).
_HOOKS = []
OPTIONS = {}


def eval_hook(maker=None, *, options: dict | None = None):
  def register(m):
    _HOOKS.append(m)
    OPTIONS.update(options or {})
    return m
  return register if maker is None else register(maker)


def eval_hooks(setup) -> list:
  """The hooks that apply to this run, in registration order."""
  return [h for h in (make(setup) for make in _HOOKS) if h is not None]


def fill_middle(setup, model, prefix_BxP, suffix_BxS, length: int, rng, *,
                sampler: str = "confidence"):
  """(B, length) greedy middles between prefix rows (starting with BOS) and suffix rows
  (width 0: no suffix). Traceable (jit it)."""
  obj = setup.objective
  name = setup.config.objective.name
  p = prefix_BxP.shape[1]
  if name == "mdlm":
    canvas = jnp.concatenate([prefix_BxP, jnp.full((prefix_BxP.shape[0], length),
                                                   tokenizers.MASK, jnp.int32), suffix_BxS], 1)
    out, _ = obj.sample(model, canvas, rng, sampler=sampler, steps=length, temperature=0.0)
    return out[:, p:p + length]
  suffix = suffix_BxS if suffix_BxS.shape[1] else None
  if suffix is not None and not obj.accepts_suffix:
    raise ValueError(f"objective {name!r} cannot condition on a suffix (train ar with "
                     "objective.fim_rate > 0 to infill).")
  out = obj.generate(model, prefix_BxP, rng, max_new_tokens=length, temperature=0.0,
                     **({} if suffix is None else {"suffix_BxS": suffix}))
  return out[:, p:p + length]


def _filler(setup, length: int):
  """A jitted (params, prefixes, suffixes, rng) -> (B, length) greedy middles."""
  return jax.jit(lambda prm, pre, suf, rng: fill_middle(setup, nnx.merge(setup.graphdef, prm),
                                                        pre, suf, length, rng))


def _batched(fn, params, prefixes, suffixes, batch, seed):
  """Runs a `_filler` over numpy rows in batches (the last one padded)."""
  out = []
  for i in range(0, len(prefixes), batch):
    pre, suf = prefixes[i:i + batch], suffixes[i:i + batch]
    n = len(pre)
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch - n, 0)]) if n < batch else a
    out.append(np.asarray(fn(params, pad(pre), pad(suf), jax.random.key(seed + i)))[:n])
  return np.concatenate(out)


def star_graph_eval(setup, split: str = "validation", max_examples: int = -1,
                    batch: int = 256):
  """(params) -> path accuracy and first-step accuracy over the split's first `max_examples`
  problems (-1: all); the problems are read and the decoder compiled once, so training can
  call it at every evaluation."""
  cfg = setup.config
  if cfg.data.name != "star_graph":
    raise ValueError(f"the star-graph task needs a model trained on data.name='star_graph' "
                     f"(this one: {cfg.data.name!r}).")
  source = builders.data_source(builders.load_builder(cfg.data), split)
  n = len(source) if max_examples < 0 else min(max_examples, len(source))
  tok = setup.tokenizer
  prompts, answers = [], []
  for i in range(n):
    question, path = star_graph.problem_parts(builders.text_of(source[i]))
    prompts.append(np.concatenate([[tokenizers.BOS], tok.encode(question)]))
    answers.append(tok.encode(path))
  prompts, answers = np.stack(prompts).astype(np.int32), np.stack(answers)
  suffixes = np.zeros((n, 0), np.int32)
  fn = _filler(setup, answers.shape[1])

  def run(params) -> dict[str, float]:
    got = _batched(fn, params, prompts, suffixes, min(batch, n), cfg.seed)
    right = np.all(got == answers, axis=1)
    first = got[:, 1] == answers[:, 1]  # the first step after the start: the hard choice
    return {"path_accuracy": float(right.mean()), "first_step_accuracy": float(first.mean()),
            "examples": n, "degree": cfg.data.graph.degree,
            "path_length": cfg.data.graph.path_length, "nodes": cfg.data.graph.nodes}
  return run


@eval_hook
def _star_graph_hook(setup):
  """Path accuracy of `eval.task_examples` validation problems on star-graph data."""
  cfg = setup.config
  if (builders.rows_of(cfg.data) != "problems" or not cfg.eval.task_examples
      or jax.process_count() != 1):
    return None
  run = star_graph_eval(setup, max_examples=cfg.eval.task_examples)

  def hook(params, step):
    found = run(params)
    row = {f"eval/{k}": found[k] for k in ("path_accuracy", "first_step_accuracy")}
    return row, {}, (f"star graph @ step {step}: path accuracy {found['path_accuracy']:.4f} | "
                     f"first step {found['first_step_accuracy']:.4f} | {found['examples']} "
                     "problems")
  return hook


@eval_hook
def _sample_hook(setup):
  """An unconditional sample of `eval.sample_tokens` tokens, when the objective has a prompt
  sampler."""
  sampler = evaluate.make_sampler(setup, setup.config.eval.sample_tokens)
  if sampler is None:
    return None

  def hook(params, step):
    text = sampler(params, jax.random.fold_in(jax.random.key(setup.config.seed + 2), step))
    return {}, {"samples/unconditional": text}, f"sample @ step {step}:\n{text}\n"
  return hook


def star_graph_accuracy(setup, params, split: str = "validation", max_examples: int = -1,
                        batch: int = 256) -> dict[str, float]:
  return star_graph_eval(setup, split, max_examples, batch)(params)


def infill_examples(setup, split: str, examples: int, context: int, span: int, seed: int):
  """(prefixes with BOS, middles, suffixes) cut at random places of the documents long enough,
  visited in a random order, again with new places when there are fewer than `examples`."""
  source = builders.data_source(builders.load_builder(setup.config.data), split)
  rng = np.random.default_rng(seed)
  need = 2 * context + span
  docs = [ids for ids in (setup.tokenizer.encode(builders.text_of(source[i]))
                          for i in range(len(source))) if len(ids) >= need]
  prefixes, middles, suffixes = [], [], []
  while docs and len(prefixes) < examples:
    for i in rng.permutation(len(docs))[:examples - len(prefixes)]:
      ids = docs[i]
      s = int(rng.integers(0, len(ids) - need + 1))
      prefixes.append(np.concatenate([[tokenizers.BOS], ids[s:s + context]]))
      middles.append(ids[s + context:s + context + span])
      suffixes.append(ids[s + context + span:s + need])
  if not prefixes:
    raise ValueError(f"no {split} document has the {need} tokens that --infill_context="
                     f"{context} and --infill_span={span} need; lower them.")
  return tuple(np.stack(a).astype(np.int32) for a in (prefixes, middles, suffixes))


def can_fill(setup) -> bool:
  """Whether the objective can fill a middle between a prefix and a suffix."""
  return setup.config.objective.name == "mdlm" or setup.objective.accepts_suffix


def infill_eval(setup, split: str = "validation", examples: int = 200, context: int = 64,
                span: int = 16, batch: int = 32):
  """(params) -> exact match and per-token accuracy of greedy middles; the spans are cut and
  the decoder compiled once, so training can call it at every evaluation."""
  limit = setup.config.data.seq_len
  if 2 * context + span + 4 > limit:
    raise ValueError(f"2 * infill_context + infill_span + 4 sentinels = "
                     f"{2 * context + span + 4} exceeds data.seq_len={limit}; lower them.")
  prefixes, middles, suffixes = infill_examples(setup, split, examples, context, span,
                                                setup.config.seed)
  fn = _filler(setup, span)

  def run(params) -> dict[str, float]:
    got = _batched(fn, params, prefixes, suffixes, min(batch, len(middles)), setup.config.seed)
    return {"exact_match": float(np.all(got == middles, axis=1).mean()),
            "token_accuracy": float((got == middles).mean()), "examples": len(middles),
            "context": context, "span": span}
  return run


def infill_scores(setup, params, split: str = "validation", examples: int = 200,
                  context: int = 64, span: int = 16, batch: int = 32) -> dict[str, float]:
  return infill_eval(setup, split, examples, context, span, batch)(params)


@eval_hook(options={"infill_examples": 0, "infill_context": 64, "infill_span": 16})
def _infill_hook(setup):
  """Greedy infilling of `eval.infill_examples` validation spans (0: off) of
  `eval.infill_span` tokens between `eval.infill_context` tokens each side, on document rows,
  for objectives that fill a middle."""
  e = setup.config.eval
  if (not e.infill_examples or builders.rows_of(setup.config.data) != "documents"
      or jax.process_count() != 1):
    return None
  if not can_fill(setup):
    raise ValueError(f"eval.infill_examples={e.infill_examples}: objective "
                     f"{setup.config.objective.name!r} cannot fill a middle (ar needs "
                     "objective.fim_rate > 0); set eval.infill_examples=0.")
  try:
    run = infill_eval(setup, examples=e.infill_examples, context=e.infill_context,
                      span=e.infill_span)
  except ValueError as err:
    raise ValueError(f"eval.infill_*: {err}") from err

  def hook(params, step):
    found = run(params)
    return ({f"eval/infill_{k}": found[k] for k in ("exact_match", "token_accuracy")}, {},
            f"infill @ step {step}: exact match {found['exact_match']:.4f} | token accuracy "
            f"{found['token_accuracy']:.4f} | {found['examples']} spans of {e.infill_span}")
  return hook


# ---------------------------------------------------------------- generative perplexity
def unigram_entropy(sample_ids) -> float:
  """The entropy in nats of one sample's own token frequencies."""
  _, counts = np.unique(np.asarray(sample_ids), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def draw_samples(setup, params, count: int, max_new_tokens: int, seed: int, batch: int = 16,
                 **options) -> list[np.ndarray]:
  """`count` unconditional samples (token ids after BOS, up to and including the first EOS)
  of the objective's prompt sampler with `options` (temperature, sampler, steps, threshold,
  ...), drawn `batch` rows at a time (`tools/bench.py` counts the network calls)."""
  obj, graphdef = setup.objective, setup.graphdef
  prompt = jnp.full((batch, 1), tokenizers.BOS, jnp.int32)
  run = jax.jit(lambda p, r: obj.generate(nnx.merge(graphdef, p), prompt, r,
                                          max_new_tokens=max_new_tokens, **options))
  samples = []
  for i in range(-(-count // batch)):
    rows = np.asarray(jax.device_get(run(params, jax.random.fold_in(jax.random.key(seed), i))))
    for row in rows[:, 1:]:
      end = np.flatnonzero(row == tokenizers.EOS)
      row = row[:end[0] + 1] if end.size else row[row != tokenizers.PAD]
      samples.append(row)
  return samples[:count]


def score_samples(scorer, params, samples, batch: int = 16) -> tuple[float, float]:
  """(sum of -log p in nats, tokens scored) of samples under an `ar` scorer's
  left-to-right factorisation: each sample as [BOS] sample, every token after BOS predicted
  (its EOS too, when it has one)."""
  if scorer.config.objective.name != "ar":
    raise ValueError(f"--scorer must be an ar workdir; it holds objective "
                     f"{scorer.config.objective.name!r}.")
  width = max(len(s) for s in samples) + 1
  limit = scorer.config.model.max_seq_len
  if width > limit:
    raise ValueError(f"samples of {width - 1} tokens do not fit the scorer's "
                     f"model.max_seq_len={limit}; draw shorter ones (--max_new_tokens).")
  graphdef = scorer.graphdef
  fn = jax.jit(lambda p, b: scorer.objective.eval_sums(nnx.merge(graphdef, p), b,
                                                       jax.random.key(0)))
  nll = tokens = 0.0
  for i in range(0, len(samples), batch):
    chunk = samples[i:i + batch]
    inputs = np.full((batch, width), tokenizers.PAD, np.int32)
    seg = np.zeros((batch, width), np.int32)
    for r, s in enumerate(chunk):
      inputs[r, 0], inputs[r, 1:len(s) + 1], seg[r, :len(s) + 1] = tokenizers.BOS, s, 1
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
    sums = jax.device_get(fn(params, {"inputs": jnp.asarray(inputs),
                                      "segment_ids": jnp.asarray(seg),
                                      "positions": jnp.asarray(pos)}))
    nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
  return nll, tokens


def gen_ppl(setup, params, scorer, scorer_params, count: int, max_new_tokens: int, seed: int,
            **options) -> dict[str, float]:
  """Generative perplexity of `count` samples under the `ar` scorer, exp(total NLL / tokens),
  with the samples' mean unigram entropy (nats): low temperatures lower both, so samplers
  compare on the two together."""
  samples = draw_samples(setup, params, count, max_new_tokens, seed, **options)
  nll, tokens = score_samples(scorer, scorer_params, samples)
  lengths = [len(s) for s in samples]
  return {"gen_ppl": float(np.exp(nll / max(tokens, 1.0))), "entropy": float(np.mean(
      [unigram_entropy(s) for s in samples])), "samples": len(samples),
          "mean_length": float(np.mean(lengths)), "tokens_scored": tokens}
