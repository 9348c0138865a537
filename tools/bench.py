"""Benchmark the train step (and optionally the input pipeline) for a config.

  python tools/bench.py --config=configs/default.py --config.train.batch_size=16 [--pipeline]

Synthetic batches (random tokens, packed rows of several segments) so the figure is the step's
own. With --sampler=NAME it times a sampler instead (generated tokens/s and network calls):
  python tools/bench.py --config=configs/default.py --sampler=ancestral --sample_steps=1000
(every sampler draws with --temperature, --top_k, --top_p and --min_p, echoed in its line).
With --call_positions=1,4,8 it times one KV-cache network call for each count of new positions
a row (what a decoding call of `ar` or `bd3lm` costs as its positions grow):
  python tools/bench.py --config=configs/bd3lm.py:tiny --call_positions=1,2,4,8,16 --steps=128
With --compare_guard=ROUNDS it times the step with and without the non-finite guard, alternated
in one process, and the save-time checksum.

Prints one JSON line: tokens_per_s, step_time_s, compile_time_s, init_time_s (parameter and
optimizer-state init, its compilation included), flops_per_token, mfu
(null where the device's peak is unknown), peak_memory_bytes, and pipeline_tokens_per_s with
--pipeline (the Grain pipeline alone on the configured dataset). --profile_dir=DIR also traces
a few steps with jax.profiler (open DIR in TensorBoard or Perfetto) and adds `profile`: the
device time per step split into matmuls, attention kernels and the rest, and the top ops.
"""
import hashlib
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from mdlm_jax import cli  # noqa: E402
import trace_summary  # noqa: E402  (tools/, beside this file)
from mdlm_jax import distributed  # noqa: E402

_CONFIG = cli.define_config()
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_PIPELINE = flags.DEFINE_bool("pipeline", False, "Also time the Grain pipeline alone.")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 200, "Batches to time.")
_SAMPLER = flags.DEFINE_string("sampler", None, "Time a sampler instead of the train step: "
                               "ar (KV cache), ancestral, ancestral_nocache, ancestral_unsynced, "
                               "confidence, llada, blm, insertion_parallel, "
                               "insertion_sequential, bd3lm (block sampler, KV cache), "
                               "bd3lm_nocache, llada_dual, llada_prefix (Fast-dLLM's dual "
                               "and prefix caches).")
_CALL_POSITIONS = flags.DEFINE_list(
    "call_positions", None, "Time one KV-cache network call instead, for each count of new "
    "positions a row (e.g. 1,2,4,8,16; `ar` decodes 1, `bd3lm` its block or two): "
    "--sample_batch rows against a --sample_len-wide cache, --steps calls in one jitted loop, "
    "the median of --sample_repeats runs.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 256, "Denoising steps of the sampler.")
_SAMPLE_LEN = flags.DEFINE_integer("sample_len", 256, "Tokens to generate per row.")
_RULE = flags.DEFINE_string("rule", "random", "bd3lm without --threshold: its step rule "
                            "(random, left_to_right or dilated; one token per call "
                            "with --sample_steps = block size).")
_BLOCK = flags.DEFINE_integer("block_length", 0, "llada, llada_dual, llada_prefix: the "
                              "block (0: one; the caches need one).")
_THRESHOLD, _FALLBACK = cli.define_threshold_flags()
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 8, "Rows sampled at once.")
_WORKDIR = flags.DEFINE_string("workdir", None, "With --sampler: the trained params of this "
                               "workdir (its config) instead of random ones; insertion samplers "
                               "then also report each row's tokens and decoding steps.")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed runs (the median is kept).")
_START = flags.DEFINE_enum(
    "insertion_start", "empty", ["empty", "validation"],
    "insertion samplers: grow [BOS] [EOS] by up to --sample_len words (empty), or, with "
    "--workdir, fill validation rows of one document between their first and last token, the "
    "canvas training gives a segment cut by the row's edges (seq_len - 2 words each).")
_DRAW = cli.define_draw_flags()  # every sampler's (insertion at 0: Stern et al.'s greedy)
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Trace --profile_steps more steps "
                                   "there and summarise the device time per step.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
_COMPARE_GUARD = flags.DEFINE_integer(
    "compare_guard", 0, "Rounds of an in-process A/B: --steps steps with the non-finite guard, "
    "then as many without, alternated; also times the save-time checksum of the state.")
_DOC_LEN = flags.DEFINE_integer("doc_len", 128, "Mean document length of the synthetic packed "
                                "rows; 0: one document per row (e.g. bst with all pairs).")


def pipeline_tokens_per_s(config, tokenizer, batches: int) -> float:
  from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = iter(pipeline.train_dataset(config, tokenizer))
  next(it)
  t0, n = time.perf_counter(), 0
  for _ in range(batches):
    n += next(it)["inputs"].size
  rate = n / (time.perf_counter() - t0)
  it.close()
  return rate


def bench_calls(config, positions: list[int]) -> dict:
  """ms per cached network call (`decode_hidden` of T new positions a row, block-causal over
  them, then the logits of the last min(T, block) as the samplers take them) for each T."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  setup, params = _setup_and_params(config)
  b, width, n = _SAMPLE_BATCH.value, _SAMPLE_LEN.value, _STEPS.value
  ms = []
  for t in positions:
    if not 0 < t <= width:
      raise app.UsageError(f"--call_positions={t} must be in [1, --sample_len={width}].")
    last = min(t, setup.config.objective.get("block_size", t))

    def calls(p, t=t, last=last):
      model = nnx.merge(setup.graphdef, p)

      def body(i, carry):
        cache, acc = carry
        cache = [dict(c, index=(i * t) % (width - t + 1)) for c in cache]   # walk the cache
        h, cache = model.decode_hidden(jnp.full((b, t), tokenizers.MASK, jnp.int32), cache,
                                       block=t, outputs=last)
        return cache, acc + jnp.sum(model.logits(h))
      return jax.lax.fori_loop(0, n, body, (model.init_cache(b, width), 0.0))[1]

    run = jax.jit(calls)
    jax.block_until_ready(run(params))
    runs = []
    for _ in range(_SAMPLE_REPEATS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(run(params))
      runs.append((time.perf_counter() - t0) / n * 1e3)
    ms.append(sorted(runs)[len(runs) // 2])
  return {"objective": setup.config.objective.name, "batch": b, "cache": width, "calls": n,
          "call_positions": positions, "ms_per_call": ms,
          "device": jax.devices()[0].device_kind}


def _setup_and_params(config):
  """The trainer setup and params: --workdir's trained ones (its config) or random ones."""
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  if _WORKDIR.value:
    from mdlm_jax import restore  # pylint: disable=g-import-not-at-top
    setup, params, _ = restore.load(_WORKDIR.value, mesh_overrides={"data": -1, "tensor": 1})
    return setup, params
  setup = trainer.build(config)
  return setup, setup.init_params()


def bench_sampler(config, draw: dict):
  """Generated tokens/s of one sampler from random params (or a workdir's trained ones), after
  compiling, and the network calls it made; `draw`: the temperature and filters."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  setup, params = _setup_and_params(config)
  name, b, n = _SAMPLER.value, _SAMPLE_BATCH.value, _SAMPLE_LEN.value
  prompt = jnp.full((b, 1), tokenizers.BOS, jnp.int32)
  if name == "ar":
    fn = lambda p, r: (setup.objective.generate(nnx.merge(setup.graphdef, p), prompt, r,
                                                max_new_tokens=n, **draw),
                             {"calls": jnp.asarray(n)})
  elif name == "blm":  # one blank grown to n tokens, one insertion per network call
    from mdlm_jax.objectives import blm  # pylint: disable=g-import-not-at-top
    canvas = blm.one_blank(prompt, n)
    fn = lambda p, r: setup.objective.fill(nnx.merge(setup.graphdef, p), canvas, r, **draw)
  elif name.startswith("insertion_"):  # [BOS] [EOS] grown by up to n insertions
    canvas = jnp.concatenate([prompt, jnp.full((b, 1), tokenizers.EOS, jnp.int32),
                              jnp.full((b, n), tokenizers.PAD, jnp.int32)], axis=1)
    region = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.full((b, 1), 2, jnp.int32),
                              jnp.zeros((b, n), jnp.int32)], axis=1)
    if _START.value == "validation":
      from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      from mdlm_jax.objectives import insertion_canvas  # pylint: disable=g-import-not-at-top
      canvas, region = map(jnp.asarray, insertion_canvas.edge_canvases(
          pipeline.eval_dataset(setup.config, setup.tokenizer), b))
    decoding = name.split("_", 1)[1]

    def fn(p, r):
      out, _, info = setup.objective.fill(nnx.merge(setup.graphdef, p), canvas, region, r,
                                          decoding=decoding, **draw)
      return out, info
  elif name.startswith("bd3lm"):
    rule = "threshold" if _THRESHOLD.value > 0 else _RULE.value
    fn = lambda p, r: setup.objective.generate_blocks(
        nnx.merge(setup.graphdef, p), prompt, r, sampler=rule, steps=_SAMPLE_STEPS.value,
        max_new_tokens=n, threshold=_THRESHOLD.value or 0.9, kv_cache=name == "bd3lm",
        fallback=_FALLBACK.value, **draw)
  else:
    canvas = jnp.concatenate([prompt, jnp.full((b, n), tokenizers.MASK, jnp.int32)], axis=1)
    sampler, extra = name, {}
    if name == "ancestral_nocache":
      sampler, extra = "ancestral", {"cache": False}
    elif name == "ancestral_unsynced":
      sampler, extra = "ancestral", {"sync_rows": False}
    elif name.startswith("llada"):
      sampler, extra = "llada", {"block_length": _BLOCK.value,
                                 "kv_cache": {"llada_dual": "dual",
                                              "llada_prefix": "prefix"}.get(name)}
      if _THRESHOLD.value > 0:
        extra["threshold"] = _THRESHOLD.value
    fn = lambda p, r: setup.objective.sample(nnx.merge(setup.graphdef, p), canvas, r,
                                             sampler=sampler, steps=_SAMPLE_STEPS.value, **extra,
                                             **draw)
  grows = name == "blm" or name.startswith("insertion_")
  stops = name.startswith("bd3lm")   # at every row's EOS: count what it wrote
  run = jax.jit(fn)
  t0 = time.perf_counter()
  jax.block_until_ready(run(params, jax.random.key(0)))
  compile_s = time.perf_counter() - t0
  runs, digest = [], hashlib.sha1()  # the digest: every repeat's outputs, in key order
  for i in range(_SAMPLE_REPEATS.value):
    t0 = time.perf_counter()
    out, info = jax.block_until_ready(run(params, jax.random.key(i + 1)))
    # blm and insertion stop by themselves: count what they wrote (BOS and EOS aside)
    made = int(jnp.sum(out != tokenizers.PAD)) - 2 * b if grows else b * n
    made = int(jnp.sum(out[:, 1:] != tokenizers.PAD)) if stops else made
    runs.append((time.perf_counter() - t0, made, int(info["calls"]),
                 int(info.get("encoded", 0))))
    digest.update(np.asarray(out).tobytes())
  dt, made, calls, encoded = sorted(runs)[len(runs) // 2]
  per_row = None
  if name.startswith("insertion_") and _WORKDIR.value:  # each row decoded on its own
    one = lambda r, c, g: setup.objective.fill(nnx.merge(setup.graphdef, params), c[None],
                                               g[None], r, decoding=decoding, **draw)
    out, _, info = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(9), b), canvas, region)
    made_rows = np.asarray(jnp.sum(out[:, 0] != tokenizers.PAD, axis=1)) - 2
    per_row = [[int(m), int(c)] for m, c in zip(made_rows, np.asarray(info["calls"]))]
  config = setup.config  # (with --workdir: the trained run's)
  if _START.value == "validation":
    n = canvas.shape[1] - 2
  out = {"objective": config.objective.name, "sampler": name, "batch": b, "length": n,
         "steps": None if name == "ar" or grows else _SAMPLE_STEPS.value,
         "network_calls": calls, "tokens": made, "seconds": dt, "tokens_per_s": made / dt,
         "compile_time_s": compile_s, "device": jax.devices()[0].device_kind,
         "outputs_sha1": digest.hexdigest(), **draw}
  if name in ("llada_dual", "llada_prefix"):   # per row: refreshes and windows
    out.update(encoded_positions=encoded, block_length=_BLOCK.value)
  if stops:
    out.update(threshold=_THRESHOLD.value, rule=rule, fallback=_FALLBACK.value,
               block_size=config.objective.block_size,
               tokens_per_call=made / max(calls * b, 1))   # per row
  if name.startswith("insertion_"):
    # forward FLOPs per written token: every encoded position (its projections, MLP and
    # attention over the row's width) and every call's slot head over the row
    cfg, t = setup.objective.model_config, canvas.shape[1]
    d, f, layers, v = cfg.d_model, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size
    per_position = 2 * (layers * (4 * d * d + 3 * d * f + 2 * t * d) + 2 * d * d)
    flops = b * (encoded * per_position + calls * t * 2 * d * v)
    out.update(encoded_positions=encoded, flops_per_token=flops / max(made, 1),
               kv_cache=bool(config.objective.kv_cache), per_row_tokens_and_steps=per_row)
  return out


def bench_train_step(config, *, steps: int, warmup: int, doc_len: int,
                     profile_dir: str | None = None, profile_steps: int = 3) -> dict:
  """Times the compiled train step on synthetic packed rows (after `warmup` untimed steps);
  with `profile_dir`, also traces `profile_steps` more and summarises the device time."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mdlm_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  setup = trainer.build(config)
  tx, schedule = trainer.make_optimizer(config.train)
  abstract_state = trainer.abstract_train_state(setup, tx)
  step_fn, compile_s = trainer.compile_step(
      trainer.make_train_step(setup, tx, schedule, abstract_state), abstract_state,
      setup.abstract_batch(), verbose=False)
  t0 = time.perf_counter()
  state = jax.block_until_ready(trainer.init_train_state(setup, tx, abstract_state))
  init_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  b, t = config.train.batch_size, config.data.seq_len
  local = pipeline.local_batch_size(b)
  vocab = setup.tokenizer.vocab_size
  batches = [pipeline.to_global(pipeline.synthetic_batch(rng, local, t, vocab, doc_len),
                                setup.batch_sharding) for _ in range(2)]
  for i in range(warmup):
    state, m = step_fn(state, batches[i % 2])
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = step_fn(state, batches[i % 2])
  jax.block_until_ready((state, m))
  step_time = (time.perf_counter() - t0) / steps
  tokens_per_s = b * t / step_time
  flops = setup.objective.flops_per_token(t)
  peak = metrics_lib.peak_flops()
  mfu = None if peak is None else tokens_per_s * flops / (peak * jax.device_count())
  stats = jax.devices()[0].memory_stats() or {}
  peak_mem = stats.get("peak_bytes_in_use")
  if peak_mem is None:  # CPU: the compiled step's own estimate
    mem = step_fn.memory_analysis()
    peak_mem = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) if mem is not None else None
  result = {
      "objective": config.objective.name, "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "batch_size": b, "seq_len": t,
      "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(setup.abstract_params))),
      "dtype": config.model.dtype, "tokens_per_s": tokens_per_s, "step_time_s": step_time,
      "compile_time_s": compile_s, "init_time_s": init_s, "flops_per_token": flops,
      "mfu": mfu, "peak_memory_bytes": peak_mem,
      "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "loss": float(m["train/loss"]),
  }
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for i in range(profile_steps):
        state, m = step_fn(state, batches[i % 2])
      jax.block_until_ready((state, m))
    result["profile"] = trace_summary.summarize_trace(profile_dir, profile_steps)
    if result["profile"].get("device_ms_per_step"):  # < 1: the device waits on the host
      result["profile"]["device_busy"] = result["profile"]["device_ms_per_step"] / (
          1e3 * step_time)
  return result


def compare_guard(config, *, rounds: int, steps: int, warmup: int, doc_len: int) -> dict:
  """The guard's cost: the same step compiled with and without it, timed in alternating rounds
  in one process (so machine noise hits both alike); the checksum's cost per step is its time
  spread over checkpoint.every_steps steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mdlm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  setup = trainer.build(config)
  tx, schedule = trainer.make_optimizer(config.train)
  abstract_state = trainer.abstract_train_state(setup, tx)
  rng = np.random.default_rng(0)
  local = pipeline.local_batch_size(config.train.batch_size)
  batches = [pipeline.to_global(pipeline.synthetic_batch(
      rng, local, config.data.seq_len, setup.tokenizer.vocab_size, doc_len),
      setup.batch_sharding) for _ in range(2)]
  runs = {}
  for name, guard in (("guard", True), ("no_guard", False)):
    fn, _ = trainer.compile_step(trainer.make_train_step(setup, tx, schedule, abstract_state,
                                                         guard=guard),
                                 abstract_state, setup.abstract_batch(), verbose=False)
    state = trainer.init_train_state(setup, tx, abstract_state)
    for i in range(warmup):
      state, _ = fn(state, batches[i % 2])
    cost = fn.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    runs[name] = [fn, jax.block_until_ready(state), [], cost or {}]
  for _ in range(rounds):
    for name in runs:
      fn, state, times, _ = runs[name]
      t0 = time.perf_counter()
      for i in range(steps):
        state, m = fn(state, batches[i % 2])
      jax.block_until_ready((state, m))
      times.append((time.perf_counter() - t0) / steps)
      runs[name][1] = state
  state = runs["guard"][1]
  items = checkpoint._items_of(state)  # pylint: disable=protected-access
  checkpoint.checksums(items)  # compile
  t0 = time.perf_counter()
  for _ in range(3):
    checkpoint.checksums(items)
  checksum_s = (time.perf_counter() - t0) / 3
  ratios = [g / n for g, n in zip(runs["guard"][2], runs["no_guard"][2])]
  # XLA's own count of the compiled steps' work: deterministic, unlike the timings
  cost_ratio = {k: runs["guard"][3][k] / runs["no_guard"][3][k]
                for k in ("flops", "bytes accessed")
                if runs["no_guard"][3].get(k) and k in runs["guard"][3]}
  step_s = float(np.median(runs["guard"][2]))
  return {"objective": config.objective.name, "device": jax.devices()[0].device_kind,
          "rounds": rounds, "steps_per_round": steps,
          "step_s_guard": runs["guard"][2], "step_s_no_guard": runs["no_guard"][2],
          "guard_over_no_guard_median": float(np.median(ratios)),
          "guard_over_no_guard_of_sums": sum(runs["guard"][2]) / sum(runs["no_guard"][2]),
          "xla_cost_guard_over_no_guard": cost_ratio, "checksum_s": checksum_s,
          "checksum_per_step_fraction": checksum_s / (config.checkpoint.every_steps * step_s)}


def main(argv):
  del argv
  if _START.value == "validation" and not (
      _WORKDIR.value and (_SAMPLER.value or "").startswith("insertion_")):
    raise app.UsageError("--insertion_start=validation fills validation rows with a trained "
                         "model: pass --sampler=insertion_parallel or insertion_sequential "
                         "and --workdir=DIR.")
  draw = _DRAW()
  distributed.initialize()
  if _SAMPLER.value:
    print(json.dumps(bench_sampler(_CONFIG.value, draw)))
    return
  if _CALL_POSITIONS.value:
    print(json.dumps(bench_calls(_CONFIG.value, [int(t) for t in _CALL_POSITIONS.value])))
    return
  config = _CONFIG.value
  if _COMPARE_GUARD.value:
    print(json.dumps(compare_guard(config, rounds=_COMPARE_GUARD.value, steps=_STEPS.value,
                                   warmup=_WARMUP.value, doc_len=_DOC_LEN.value)))
    return
  result = bench_train_step(config, steps=_STEPS.value, warmup=_WARMUP.value,
                            doc_len=_DOC_LEN.value, profile_dir=_PROFILE_DIR.value,
                            profile_steps=_PROFILE_STEPS.value)
  if _PIPELINE.value:
    from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
    result["pipeline_tokens_per_s"] = pipeline_tokens_per_s(
        config, tokenizers.get_tokenizer(config.data.tokenizer), _PIPELINE_BATCHES.value)
    result["pipeline_over_step"] = result["pipeline_tokens_per_s"] / result["tokens_per_s"]
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
