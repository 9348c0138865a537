"""State init, the one jitted train step, and the training loop.

    setup = build(config)                 # abstract params + shardings; nothing compiled yet
    train(config, workdir)                # restore-or-init, compile, loop, checkpoint, eval

The trainer knows nothing objective-specific: an objective builds its modules and gives
`loss(model, batch, rng)`; here the params pytree is merged into the module and differentiated.
"""
from __future__ import annotations

import dataclasses
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
from mdlm_jax import optim
from mdlm_jax.optim import make_optimizer  # noqa: F401  (part of the trainer's API)
from mdlm_jax import preemption
from mdlm_jax import run_record
from mdlm_jax import sharding
from mdlm_jax import storage
from mdlm_jax import tasks
from mdlm_jax import tokenizers
from mdlm_jax.data import builders
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
  undivided: tuple[str, ...] = ()  # parameter dims kept replicated: the mesh does not divide

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
  undivided = []
  shardings = sharding.param_shardings(abs_state, mesh, undivided)
  abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abs_state), shardings)
  return Setup(config, tokenizer, objective, mesh, graphdef, abstract, shardings,
               sharding.batch_sharding(mesh), tuple(undivided))


SKIP_COUNTERS = ("total", "consecutive", "worst")  # non-finite steps skipped (see the step)


def abstract_train_state(setup: Setup, tx) -> dict:
  """Abstract state {step, params, opt_state, ema, skips} with shardings on every leaf."""
  rep = sharding.replicated(setup.mesh)
  params = setup.abstract_params
  opt = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt, setup.param_shardings,
                                        transform_non_params=lambda _: rep)
  opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                     opt_shardings)
  ema = params if setup.config.train.ema_decay > 0 else None
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  return {"step": scalar, "params": params, "opt_state": opt, "ema": ema,
          "skips": {k: scalar for k in SKIP_COUNTERS}}


def shardings_of(abstract_tree):
  return jax.tree.map(lambda a: a.sharding, abstract_tree)


def init_train_state(setup: Setup, tx, abstract_state) -> dict:
  params = setup.init_params()

  def fn(params):
    zero = jnp.zeros((), jnp.int32)
    return {"step": zero, "params": params, "opt_state": tx.init(params),
            "ema": params if abstract_state["ema"] is not None else None,
            "skips": {k: zero for k in SKIP_COUNTERS}}
  return jax.jit(fn, out_shardings=shardings_of(abstract_state))(params)


def make_loss_and_grads(setup: Setup):
  """(params, batch, rng) -> (loss, metrics, grads) of the whole batch. With
  train.grad_accum_steps = k the batch runs as k microbatches whose sums (loss numerator,
  denominator, metrics, gradient of the numerator) are added up and divided once, so the
  result is the full batch's up to rounding; the gradient carry keeps the params' shardings."""
  objective, graphdef = setup.objective, setup.graphdef
  accum = setup.config.train.grad_accum_steps

  def sums_fn(params, batch, rng):
    num, den, metrics = objective.loss_sums(nnx.merge(graphdef, params), batch, rng)
    return num, (den, metrics)

  grad_fn = jax.value_and_grad(sums_fn, has_aux=True)
  constrain = lambda g: jax.lax.with_sharding_constraint(g, setup.param_shardings)

  def loss_and_grads(params, batch, rng):
    if accum == 1:
      (num, (den, metrics)), grads = grad_fn(params, batch, rng)
    else:
      # Row j of microbatch i is row j * accum + i, so every device keeps its own rows.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
          batch)

      def body(carry, xs):
        # The params ride in the carry behind an optimization barrier, so XLA cannot hoist
        # their FSDP all-gathers out of the loop (which would keep a full copy of each).
        p, sums = jax.lax.optimization_barrier(carry)
        i, mb = xs
        out = grad_fn(p, mb, jax.random.fold_in(rng, i))
        total = jax.tree.map(jnp.add, sums, out)
        return (p, (total[0], constrain(total[1]))), None

      shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
      zeros = (zeros[0], constrain(zeros[1]))
      (_, ((num, (den, metrics)), grads)), _ = jax.lax.scan(
          body, (params, zeros), (jnp.arange(accum), micro))
    den = jax.lax.stop_gradient(den)
    scale = 1.0 / jnp.where(den == 0, 1.0, den)
    loss, metrics = objectives.base.finish(num, den, metrics)
    return loss, metrics, jax.tree.map(lambda g: g * scale, grads)

  return loss_and_grads


def make_train_step(setup: Setup, tx, schedule, abstract_state, guard: bool = True):
  """The jitted step: (state, batch) -> (state, metrics). State is donated.

  Non-finite guard: a step whose loss or gradient norm is not finite leaves params, optimizer
  state and EMA unchanged (the step counter still advances) and counts itself in `skips`
  (total, and consecutive for train.max_skipped_steps), read by the loop with the metrics.
  `guard=False` drops the guard's selects (only `tools/bench.py --compare_guard` uses it)."""
  cfg = setup.config.train
  base_key = jax.random.key(setup.config.seed)
  loss_and_grads = make_loss_and_grads(setup)

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_key, state["step"])
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):  # activation constraints
      loss, aux, grads = loss_and_grads(state["params"], batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = state["ema"]
    if ema is not None:
      d = optim.ema_decay(cfg.ema_decay, state["step"] + 1)
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if guard:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    else:
      keep = lambda new, old: new
    skipped = (~ok).astype(jnp.int32)
    run = (state["skips"]["consecutive"] + 1) * skipped
    window_start = state["step"] % cfg.log_every_steps == 0  # the worst run since the last log
    skips = {"total": state["skips"]["total"] + skipped, "consecutive": run,
             "worst": jnp.maximum(jnp.where(window_start, 0, state["skips"]["worst"]), run)}
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": schedule(state["step"]),
               "train/skipped_steps": skips["total"],
               "train/consecutive_skips": skips["worst"]}
    metrics.update({f"train/{k}": v for k, v in aux.items()})
    new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "ema": None if ema is None else keep(ema, state["ema"]), "skips": skips}
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


class TrainingDiverged(RuntimeError):
  """train.max_skipped_steps consecutive steps had a non-finite loss or gradient norm."""


def _print(line: str) -> None:
  print(line, flush=True)


def _prepare_state(setup, tx, workdir, data_it, log, dataset=None):
  """Restores the newest good checkpoint of `workdir` (or initialises), records the config.
  Returns (manager, state, data iterator)."""
  config = setup.config
  config_dict = config.to_dict()
  saved = run_record.load_saved_config(workdir)
  changes = run_record.config_changes(saved, config_dict) if saved is not None else {}
  abstract_state = abstract_train_state(setup, tx)
  restore_data = config.checkpoint.restore_data
  mngr, state = checkpoint.resume(workdir, abstract_state, data_it, keep=config.checkpoint.keep,
                                  changes=changes, restore_data=restore_data)
  if state is None:
    state, step = init_train_state(setup, tx, abstract_state), 0
  else:
    step = int(jax.device_get(state["step"]))
    log(f"Resumed from step {step} in {workdir}")
    if not restore_data:
      data_it.close()
      data_it = iter(pipeline.train_dataset(config, setup.tokenizer, seed_offset=step))
      log(f"checkpoint.restore_data=False: the data order restarts, reshuffled with seed "
          f"{config.seed} + {step}.")
  changes = run_record.record_config(workdir, config_dict, step, dataset)
  if changes and saved is not None:
    log("Settings changed since the workdir's last run (recorded in its config.json):\n  "
        + run_record.describe_changes(changes))
  return mngr, state, data_it, abstract_state


def train(config, workdir: str, *, log: Callable[[str], None] = _print) -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds a checkpoint); returns the last metrics and
  the step it stopped at (`step`).
  `workdir` is a local path or an epath URL (gs://...). Order: config, data and checkpoint
  compatibility checks (nothing written yet), the workdir lock, restore-or-init, then the step
  compiles and the loop runs."""
  setup = build(config)
  log = log if jax.process_index() == 0 else (lambda _: None)
  wd = storage.path(workdir)
  # the data first: a missing, unpreparable or mis-sized dataset fails before anything is
  # written or compiled
  data_it = iter(pipeline.train_dataset(config, setup.tokenizer))
  hooks = []
  if config.eval.every_steps:
    pipeline.check_split(config, "validation")
    hooks = tasks.eval_hooks(setup)  # a task's bad settings fail here, before any write
  tx, _ = make_optimizer(config.train)
  saved = run_record.load_saved_config(wd)
  checkpoint.check_resumable(
      wd, abstract_train_state(setup, tx), restore_data=config.checkpoint.restore_data,
      changes=run_record.config_changes(saved, config.to_dict()) if saved is not None else {})
  lock = None
  if jax.process_index() == 0:
    lock = storage.Lock(wd, timeout_s=config.checkpoint.lock_timeout_s).acquire()
  try:
    dataset = builders.describe(builders.load_builder(config.data))
    return _train(setup, wd, data_it, log, hooks, dataset)
  finally:
    if lock is not None:
      lock.release()


def _train(setup, wd, data_it, log, hooks, dataset=None):
  config, t = setup.config, setup.config.train
  started = time.time()
  tx, schedule = make_optimizer(t)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(setup.abstract_params))
  log(f"objective {config.objective.name} | {n_params / 1e6:.2f}M params | mesh "
      f"{dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices | "
      f"{jax.process_count()} process(es)")
  if setup.undivided:
    log(f"kept replicated, as the mesh does not divide them: {'; '.join(setup.undivided)}")
  if (hosts := sharding.hosts_per_tensor_group(setup.mesh)) > 1:
    log(f"mesh.tensor={setup.mesh.shape['tensor']} spans {hosts} hosts: its all-reduces cross "
        "the host network; a tensor size of at most one host's devices keeps them inside one.")
  mngr, state, data_it, abstract_state = _prepare_state(setup, tx, wd, data_it, log,
                                                        dataset)
  step = int(jax.device_get(state["step"]))
  step_fn, _ = compile_step(make_train_step(setup, tx, schedule, abstract_state),
                            abstract_state, setup.abstract_batch())

  writer = metrics_lib.Writer(wd)
  progress = metrics_lib.Progress(
      t.steps, step, t.batch_size * config.data.seq_len,
      setup.objective.flops_per_token(config.data.seq_len), jax.device_count())
  evaluator = evaluate_lib.Evaluator(setup)
  last: dict[str, float] = {}
  pending, input_s, tracing = None, 0.0, False

  def flush():
    nonlocal pending
    if pending is not None:
      s, m, waited = pending
      pending = None
      row = {k: float(v) for k, v in jax.device_get(m).items()}
      row.update(progress.update(s, waited))
      writer.scalars(s, row)
      log(metrics_lib.Progress.line(s, t.steps, row))
      last.update(row)
      if row["train/consecutive_skips"] >= t.max_skipped_steps:
        raise TrainingDiverged(
            f"{int(row['train/consecutive_skips'])} consecutive steps up to step {s} had a "
            f"non-finite loss or gradient norm (last: loss {row['train/loss']}, grad norm "
            f"{row['train/grad_norm']}); they were skipped, so the params and every checkpoint "
            f"are finite, and the run stops (train.max_skipped_steps={t.max_skipped_steps}). "
            "Lower train.learning_rate or raise train.warmup_steps, then resume.")

  try:
    with preemption.StopSignal() as stop:
      while step < t.steps:
        if t.profile_steps and step + 1 == t.profile_start:
          jax.profiler.start_trace(str(wd / "profile"), create_perfetto_trace=True)
          tracing = True
          log(f"profiling steps {t.profile_start}..{t.profile_start + t.profile_steps - 1} "
              f"into {wd / 'profile'}")
        t_input = time.perf_counter()
        batch = pipeline.to_global(next(data_it), setup.batch_sharding)
        input_s += time.perf_counter() - t_input
        state, m = step_fn(state, batch)
        step += 1
        flush()  # the previous step's metrics, read after this step was dispatched
        if tracing and step == t.profile_start + t.profile_steps - 1:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          tracing = False
        if step % t.log_every_steps == 0 or step == t.steps:
          pending, input_s = (step, m, input_s), 0.0  # the window's input time, steps to `step`
        stopping = stop.at(step)
        if step % config.checkpoint.every_steps == 0 or step == t.steps or stopping:
          checkpoint.save(mngr, state, data_it)
          log(f"saving step {step} to {mngr.directory / str(step)} (asynchronously)")
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == t.steps):
          flush()
          params = state["ema"] if state["ema"] is not None else state["params"]
          result = evaluator.run(params, config.eval.batches)
          writer.scalars(step, result)
          log(evaluate_lib.format_line(step, result))
          last.update(result)
          for hook in hooks:
            scalars, texts, line = hook(params, step)
            if scalars:
              writer.scalars(step, scalars)
              last.update(scalars)
            for tag, text in texts.items():
              writer.text(step, tag, text)
            log(line)
        if stopping:
          log(f"SIGTERM: saved step {step}; exiting.")
          break
      flush()
      last["step"] = step
  finally:
    if tracing:
      jax.profiler.stop_trace()
    mngr.wait_until_finished()
    saved = mngr.latest_step()
    mngr.close()
    writer.close()
    data_it.close()
  log(metrics_lib.summary(wd, last, time.time() - started, saved))
  return last

