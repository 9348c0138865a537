"""State init, the one jitted train step, and the training loop.

    setup = build(config)                 # abstract params + shardings; nothing compiled yet
    train(config, workdir)                # restore-or-init, compile, loop, checkpoint, eval

The trainer knows nothing objective-specific: an objective builds its modules and gives
`loss(model, batch, rng)`; here the params pytree is merged into the module and differentiated.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdlm_jax import checkpoint
from mdlm_jax import config as config_lib
from mdlm_jax import evaluate as evaluate_lib
from mdlm_jax import metrics as metrics_lib
from mdlm_jax import objectives
from mdlm_jax import sharding
from mdlm_jax import tasks
from mdlm_jax import tokenizers
from mdlm_jax.data import pipeline


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before compiling: objective, mesh, abstract params."""
  config: Any
  tokenizer: tokenizers.Tokenizer
  objective: objectives.Objective
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_params: Any      # ShapeDtypeStructs carrying their NamedShardings
  param_shardings: Any
  batch_sharding: jax.sharding.NamedSharding

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def init_params(self):
    objective, seed = self.objective, self.config.seed
    fn = lambda: nnx.to_pure_dict(nnx.state(objective.build(nnx.Rngs(seed))))
    return jax.jit(fn, out_shardings=self.param_shardings)()

  def abstract_batch(self, batch_size: int | None = None):
    b = batch_size or self.config.train.batch_size
    return {k: jax.ShapeDtypeStruct((b, self.config.data.seq_len), jnp.int32,
                                    sharding=self.batch_sharding)
            for k in pipeline.batch_keys(self.config.data)}


def build(config, mesh=None) -> Setup:
  config_lib.validate(config)
  tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  objective = objectives.create(config, tokenizer)
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % dp:
    raise config_lib.ConfigError(
        f"train.batch_size={config.train.batch_size} / train.grad_accum_steps="
        f"{config.train.grad_accum_steps} = {micro} rows per step must be divisible by the "
        f"data-parallel size mesh.data x mesh.fsdp = {dp}; change train.batch_size or the mesh.")
  abs_model = nnx.eval_shape(lambda: objective.build(nnx.Rngs(config.seed)))
  graphdef, abs_state = nnx.split(abs_model)
  shardings = sharding.param_shardings(abs_state, mesh)
  abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abs_state), shardings)
  return Setup(config, tokenizer, objective, mesh, graphdef, abstract, shardings,
               sharding.batch_sharding(mesh))


def make_optimizer(t) -> tuple[optax.GradientTransformation, Callable]:
  if t.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.min_lr_ratio)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1)),
         optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on norms
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule


def abstract_train_state(setup: Setup, tx) -> dict:
  """Abstract state {step, params, opt_state, ema} with shardings on every leaf."""
  rep = sharding.replicated(setup.mesh)
  params = setup.abstract_params
  opt = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt, setup.param_shardings,
                                        transform_non_params=lambda _: rep)
  opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                     opt_shardings)
  ema = params if setup.config.train.ema_decay > 0 else None
  return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), "params": params,
          "opt_state": opt, "ema": ema}


def shardings_of(abstract_tree):
  return jax.tree.map(lambda a: a.sharding, abstract_tree)


def init_train_state(setup: Setup, tx, abstract_state) -> dict:
  params = setup.init_params()

  def fn(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema": params if abstract_state["ema"] is not None else None}
  return jax.jit(fn, out_shardings=shardings_of(abstract_state))(params)


def ema_decay(decay: float, updates):
  """The EMA's decay at its `updates`-th update: min(decay, (1 + n) / (10 + n)), the warm-up of
  MDLM's (score-SDE's) EMA, so a short run's EMA is not still mostly the initialisation (with
  0.9999 and no warm-up, 96% of it after 400 steps)."""
  return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


def make_train_step(setup: Setup, tx, schedule, abstract_state):
  """The jitted step: (state, batch) -> (state, metrics). State is donated."""
  cfg = setup.config.train
  objective, graphdef = setup.objective, setup.graphdef
  base_key = jax.random.key(setup.config.seed)
  accum = cfg.grad_accum_steps

  def loss_fn(params, batch, rng):
    return objective.loss(nnx.merge(graphdef, params), batch, rng)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def loss_and_grads(params, batch, rng):
    if accum == 1:
      return grad_fn(params, batch, rng)
    # Row j of microbatch i is row j * accum + i, so every device keeps its own rows.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
      i, mb = xs
      out = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zeros)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return jax.tree.map(lambda x: x / accum, total)

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_key, state["step"])
    (loss, aux), grads = loss_and_grads(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = state["ema"]
    if ema is not None:
      d = ema_decay(cfg.ema_decay, state["step"] + 1)
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
               "train/learning_rate": schedule(state["step"])}
    metrics.update({f"train/{k}": v for k, v in aux.items()})
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
    return new_state, metrics

  state_shardings = shardings_of(abstract_state)
  return jax.jit(step_fn, in_shardings=(state_shardings, setup.batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def compile_step(step_fn, abstract_state, abstract_batch, verbose: bool = True):
  t0 = time.perf_counter()
  compiled = step_fn.lower(abstract_state, abstract_batch).compile()
  seconds = time.perf_counter() - t0
  if verbose and jax.process_index() == 0:
    mem = compiled.memory_analysis()
    extra = ""
    if mem is not None:
      total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
      extra = (f"; per-device memory: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
               f"temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, total ~{total / 2**20:.1f} MiB")
    print(f"Compiled the train step in {seconds:.1f}s{extra}", flush=True)
  return compiled, seconds


class _StopSignal:
  """Turns SIGTERM into a flag the loop polls: save, wait for the save, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """True on every process when any process was asked to stop."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


def _print(line: str) -> None:
  print(line, flush=True)


def train(config, workdir: str, *, log: Callable[[str], None] = _print) -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds a checkpoint); returns the last metrics."""
  setup = build(config)
  log = log if jax.process_index() == 0 else (lambda _: None)
  config_dict = config.to_dict()
  checkpoint.check_compatible(workdir, config_dict)
  t = config.train
  tx, schedule = make_optimizer(t)
  abstract_state = abstract_train_state(setup, tx)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(setup.abstract_params))
  log(f"objective {config.objective.name} | {n_params / 1e6:.2f}M params | mesh "
      f"{dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices | "
      f"{jax.process_count()} process(es)")

  step_fn, _ = compile_step(make_train_step(setup, tx, schedule, abstract_state),
                            abstract_state, setup.abstract_batch())
  data_it = iter(pipeline.train_dataset(config, setup.tokenizer))
  checkpoint.save_config(workdir, config_dict)
  mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep)
  state = checkpoint.restore_latest(mngr, abstract_state, data_it)
  if state is None:
    state = init_train_state(setup, tx, abstract_state)
  else:
    log(f"Resumed from step {int(state['step'])} in {workdir}")
  step = int(jax.device_get(state["step"]))

  writer = metrics_lib.Writer(workdir)
  progress = metrics_lib.Progress(
      t.steps, step, t.batch_size * config.data.seq_len,
      setup.objective.flops_per_token(config.data.seq_len), jax.device_count())
  evaluator = evaluate_lib.Evaluator(setup)
  sampler = evaluate_lib.make_sampler(setup, config.eval.sample_tokens)
  task = None  # star-graph data: path accuracy of eval.task_examples validation problems
  if config.data.name == "star_graph" and config.eval.task_examples and jax.process_count() == 1:
    task = tasks.star_graph_eval(setup, max_examples=config.eval.task_examples)
  last: dict[str, float] = {}
  pending = None

  def flush():
    nonlocal pending, last
    if pending is not None:
      s, m = pending
      pending = None
      row = {k: float(v) for k, v in jax.device_get(m).items()}
      row.update(progress.update(s))
      writer.scalars(s, row)
      log(metrics_lib.Progress.line(s, t.steps, row))
      last.update(row)

  with _StopSignal() as stop:
    while step < t.steps:
      batch = pipeline.to_global(next(data_it), setup.batch_sharding)
      state, m = step_fn(state, batch)
      step += 1
      flush()  # the previous step's metrics, read after this step was dispatched
      if step % t.log_every_steps == 0 or step == t.steps:
        pending = (step, m)
      check_stop = jax.process_count() == 1 or step % t.log_every_steps == 0
      stopping = check_stop and stop.agreed()
      if step % config.checkpoint.every_steps == 0 or step == t.steps or stopping:
        checkpoint.save(mngr, state, data_it)
      if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == t.steps):
        flush()
        params = state["ema"] if state["ema"] is not None else state["params"]
        result = evaluator.run(params, config.eval.batches)
        writer.scalars(step, result)
        log(evaluate_lib.format_line(step, result))
        last.update(result)
        if task is not None:
          found = task(params)
          row = {f"eval/{k}": found[k] for k in ("path_accuracy", "first_step_accuracy")}
          writer.scalars(step, row)
          log(f"star graph @ step {step}: path accuracy {found['path_accuracy']:.4f} | first "
              f"step {found['first_step_accuracy']:.4f} | {found['examples']} problems")
          last.update(row)
        if sampler is not None:
          text = sampler(params, jax.random.fold_in(jax.random.key(config.seed + 2), step))
          writer.text(step, "samples/unconditional", text)
          log(f"sample @ step {step}:\n{text}\n")
      if stopping:
        log(f"SIGTERM: saved step {step}; exiting.")
        break
    flush()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  data_it.close()
  return last
