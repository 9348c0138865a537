"""The train step and loop: sharding, exact resume, checkpoints, config contracts."""
import glob
import gzip
import json
import os
import re
import sys

import chex
import jax
import numpy as np
import pytest

from mdlm_jax import checkpoint
from mdlm_jax import config as config_lib
from mdlm_jax import sharding
from mdlm_jax import trainer
from mdlm_jax.data import pipeline

quiet = lambda _: None


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def run_steps(cfg, mesh, batches):
  setup = trainer.build(cfg, mesh)
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  step = trainer.make_train_step(setup, tx, schedule, abstract)
  state = trainer.init_train_state(setup, tx, abstract)
  out = []
  for b in batches:
    state, m = step(state, pipeline.to_global(b, setup.batch_sharding))
    out.append(float(m["train/loss"]))
  return out, jax.device_get(state["params"]), setup


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mdlm", "blm", "insertion", "bd3lm"])
def test_sharded_step_on_8_devices_matches_one_device(make_config, objective):
  assert jax.device_count() == 8
  # Adam's update g / (sqrt(v) + eps) turns the rounding noise of a gradient near zero into a
  # step of the learning rate's size (blm's blank scorer sums terms that cancel, so its noise is
  # ~1e-4 of it, and its sharded sum runs in another order); eps = 1e-4 bounds that to
  # lr * noise / eps, while a wrong gradient still moves a parameter by ~lr
  cfg = make_config({"model.num_heads": 4, "train.ema_decay": 0.9, "objective.name": objective,
                     "train.adam_eps": 1e-4})
  it = iter(pipeline.train_dataset(cfg, trainer.build(cfg).tokenizer))
  batches = [next(it) for _ in range(3)]
  it.close()   # its read threads stop now, not whenever the collector gets to them
  one, params_one, _ = run_steps(cfg, sharding.make_mesh(cfg.mesh), batches)
  mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  eight, params_eight, setup = run_steps(cfg, mesh8, batches)
  # the parameters really are split over the fsdp and tensor axes
  shardings = setup.param_shardings
  wq = shardings.get("backbone", shardings)["blocks"][0]["attn"]["wq"]
  assert wq.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  chex.assert_trees_all_close(params_eight, params_one, rtol=2e-4, atol=1e-5)


@pytest.mark.slow
def test_scanned_layers_on_8_devices_train_as_unrolled_on_one(make_config, tmp_path):
  """Stacked parameters keep their fsdp / tensor sharding behind a replicated layers axis; the
  losses and parameters follow the unrolled model's; a workdir of the other layout is refused
  with the setting named."""
  cfg = make_config({"model.num_heads": 4, "objective.name": "mdlm", "train.adam_eps": 1e-4})
  scanned = make_config({"model.num_heads": 4, "objective.name": "mdlm",
                         "model.scan_layers": True, "train.adam_eps": 1e-4})  # see above
  it = iter(pipeline.train_dataset(cfg, trainer.build(cfg).tokenizer))
  batches = [next(it) for _ in range(3)]
  it.close()   # its read threads stop now, not whenever the collector gets to them
  one, params_one, _ = run_steps(cfg, sharding.make_mesh(cfg.mesh), batches)
  eight, params_eight, setup = run_steps(
      scanned, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), batches)
  shardings = setup.param_shardings
  wq = shardings.get("backbone", shardings)["blocks"]["attn"]["wq"]
  assert wq.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  net = params_eight.get("backbone", params_eight)
  blocks = net["blocks"]
  net["blocks"] = {
      i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(cfg.model.num_layers)}
  chex.assert_trees_all_close(params_eight, params_one, rtol=2e-4, atol=1e-5)
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  with pytest.raises(ValueError, match="model.scan_layers: False in the workdir, True now"):
    trainer.train(make_config({"train.steps": 4, "model.scan_layers": True}), wd, log=quiet)


@pytest.mark.slow
def test_profile_window_is_traced_inside_the_run_and_hosts_are_timed(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  lines = []
  trainer.train(make_config({"train.steps": 4, "train.log_every_steps": 1,
                             "train.profile_start": 2, "train.profile_steps": 2}),
                wd, log=lines.append)
  traces = glob.glob(f"{wd}/profile/**/perfetto_trace.json.gz", recursive=True)
  assert len(traces) == 1
  with gzip.open(traces[0]) as f:
    events = json.load(f)["traceEvents"]
  # the trace holds exactly the train step's calls of steps 2 and 3 (each call is two nested
  # events, the Python call and jax's own)
  calls = [(e["ts"], e["ts"] + e["dur"]) for e in events
           if e.get("ph") == "X" and e.get("name") == "PjitFunction(jit(step_fn))"]
  outer = [c for c in calls if not any(o != c and o[0] <= c[0] and c[1] <= o[1] for o in calls)]
  assert len(outer) == 2
  assert any("profiling steps 2..3" in line for line in lines)
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  logged = [r for r in rows if "train/loss" in r]
  assert [r["perf/slowest_host"] for r in logged] == [0] * 4
  assert all(r["perf/slowest_host_input_time_s"] == r["perf/input_time_s"] >= 0 for r in logged)


@pytest.mark.slow
@pytest.mark.parametrize("objective,scan", [("ar", False), ("mdlm", False), ("mdlm", True),
                                            ("bd3lm", False)])
def test_a_2x2x2_mesh_compiles_without_involuntary_rematerialization(make_config, objective,
                                                                     scan, capfd,
                                                                     uncached_compilation):
  """Activations are constrained to their batch sharding at block boundaries and the embedding
  table is gathered whole over fsdp before the lookup, so XLA never falls back to replicating
  an activation to reshard it (with gradient accumulation, scanned layers too)."""
  cfg = make_config({"objective.name": objective, "model.num_heads": 4, "model.d_model": 64,
                     "train.grad_accum_steps": 2, "model.scan_layers": scan})
  setup = trainer.build(cfg, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  capfd.readouterr()
  trainer.compile_step(trainer.make_train_step(setup, tx, schedule, abstract), abstract,
                       setup.abstract_batch(), verbose=False)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err


@pytest.mark.slow
def test_fsdp_keeps_parameters_sharded_inside_the_accumulation_loop(make_config):
  """With FSDP and gradient accumulation the microbatch loop carries each parameter and its
  gradient sum as their 1/fsdp shards: no full copy of a parameter is hoisted out of the loop
  (which XLA does to an all-gather it can move, keeping every parameter whole in memory)."""
  cfg = make_config({"objective.name": "ar", "model.num_heads": 4, "model.d_model": 64,
                     "model.mlp_dim": 256, "train.grad_accum_steps": 2, "train.batch_size": 16})
  setup = trainer.build(cfg, sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  compiled, _ = trainer.compile_step(trainer.make_train_step(setup, tx, schedule, abstract),
                                     abstract, setup.abstract_batch(), verbose=False)
  loops = [line for line in compiled.as_text().splitlines() if " while(" in line]
  assert len(loops) == 1
  carried = loops[0].split(" while(")[0]
  floats = sum(int(np.prod([int(d) for d in dims.split(",") if d]))
               for dims in re.findall(r"f32\[([\d,]*)\]", carried))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  # the params' shards and the gradient sums' shards, plus scalars and the rotary tables
  # (2 x 64 x 8); one whole parameter matrix would add at least 64 x 64
  assert 2 * params / 8 <= floats <= 2 * params / 8 + 2 * 64 * 8 + 16, (floats, params)


def test_dimensions_the_mesh_does_not_divide_are_named(make_config):
  cfg = make_config({"model.num_heads": 4, "model.mlp_dim": 66})
  setup = trainer.build(cfg, sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}))
  vocab = setup.tokenizer.vocab_size
  expected = {f"blocks.{i}.mlp.{w} mlp=66 over tensor=4"
              for i in range(cfg.model.num_layers) for w in ("w_gate", "w_up", "w_down")}
  if vocab % 4:
    expected.add(f"embed vocab={vocab} over tensor=4")
  assert set(setup.undivided) == expected
  assert trainer.build(cfg, sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})).undivided \
      == ((f"embed vocab={vocab} over tensor=2",) if vocab % 2 else ())


@pytest.mark.slow
def test_ema_follows_the_warmed_up_recurrence(make_config):
  """EMA_n = d_n EMA_(n-1) + (1 - d_n) params_n from the initial params, d_n = min(d, (1 + n) /
  (10 + n)), recomputed in numpy from the params of every step."""
  d = 0.99
  cfg = make_config({"train.ema_decay": d})
  setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh))
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  step = trainer.make_train_step(setup, tx, schedule, abstract)
  state = trainer.init_train_state(setup, tx, abstract)
  expected = jax.device_get(state["params"])
  it = iter(pipeline.train_dataset(cfg, setup.tokenizer))
  for n in range(1, 4):
    state, _ = step(state, pipeline.to_global(next(it), setup.batch_sharding))
    dn = min(d, (1 + n) / (10 + n))
    expected = jax.tree.map(lambda e, p: dn * e + (1 - dn) * p, expected,
                            jax.device_get(state["params"]))
  it.close()
  chex.assert_trees_all_close(jax.device_get(state["ema"]), expected, rtol=1e-5, atol=1e-6)


def test_mesh_inference_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.mesh_shape({"data": 4, "fsdp": 2, "tensor": 2}, 8)


def test_a_mesh_smaller_than_the_devices_is_refused_unless_asked():
  c = config_lib.base_config()
  c.mesh.update(data=2, fsdp=2)
  with pytest.raises(ValueError, match=r"uses 4 of the 8 devices.*allow_unused_devices=True"):
    sharding.make_mesh(c.mesh)
  c.mesh.allow_unused_devices = True
  assert dict(sharding.make_mesh(c.mesh).shape) == {"data": 2, "fsdp": 2, "tensor": 1}
  c.mesh.update(data=-1, allow_unused_devices=False)
  assert sharding.make_mesh(c.mesh).devices.size == 8


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_losses_exactly(tmp_path, make_config):
  over = {"train.steps": 6, "train.ema_decay": 0.5, "train.grad_accum_steps": 2,
          "objective.meap_mask_ratio": 0.15, "checkpoint.every_steps": 3}
  straight = str(tmp_path / "straight")
  trainer.train(make_config(over), straight, log=quiet)
  split = str(tmp_path / "split")
  trainer.train(make_config({**over, "train.steps": 3}), split, log=quiet)
  assert sorted(losses(split)) == [1, 2, 3]
  trainer.train(make_config(over), split, log=quiet)
  a, b = losses(straight), losses(split)
  assert sorted(b) == list(range(1, 7))
  assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)], "resume is not exact"
  assert a[6] < a[1]


@pytest.mark.slow
def test_workdir_of_another_model_is_refused_untouched(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{wd}/**", recursive=True)}
  with pytest.raises(ValueError, match="model.d_model: 32 in the workdir, 48 now"):
    trainer.train(make_config({"train.steps": 4, "model.d_model": 48}), wd, log=quiet)
  after = {p: os.path.getmtime(p) for p in glob.glob(f"{wd}/**", recursive=True)}
  assert before == after
  # without config.json the checkpoint's own shapes still refuse it
  os.remove(os.path.join(wd, "config.json"))
  with pytest.raises(ValueError, match="other shapes"):
    trainer.train(make_config({"train.steps": 4, "model.d_model": 48}), wd, log=quiet)


@pytest.mark.parametrize("override,message", [
    ({"train.batch_size": 6, "mesh.data": 4}, "divisible by the data-parallel size"),
    ({"data.seq_len": 128}, "exceeds the model's limit model.max_seq_len=64"),
    ({"model.dtype": "float16"}, "model.dtype='float16'"),
    ({"model.d_model": 33}, "divisible by model.num_heads"),
    ({"objective.name": "nope"}, "objective.name='nope' is unknown"),
    ({"train.grad_accum_steps": 3}, "train.grad_accum_steps=3"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one of mesh"),
    ({"data.name": "text_files", "data.files": ""}, "needs data.files"),
    ({"train.ema_decay": 1.0}, "train.ema_decay"),
    ({"train.adam_eps": 0.0}, "train.adam_eps=0.0 must be > 0"),
    ({"model.attention": "cudnn"}, "model.attention='cudnn' needs model.dtype='bfloat16'"),
    ({"model.attention": "cudnn_packed"}, "model.attention='cudnn_packed' needs model.dtype"),
    ({"model.max_segments": 1}, "model.max_segments=1 must be >= 2"),
    ({"data.workers": -1}, "data.workers=-1"),
    ({"train.profile_steps": -1}, "train.profile_steps=-1"),
])
def test_bad_config_values_are_refused_before_compiling(make_config, override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    trainer.build(make_config(override))


def test_config_from_saved_dict_roundtrips(make_config):
  cfg = make_config({"model.d_model": 48})
  again = config_lib.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert again.to_dict() == cfg.to_dict()


def test_config_variants_have_their_stated_sizes():
  """configs/NAME.py is ~125M parameters, :small GPT-2 small's 12 x 768, :tiny the CPU shape;
  counted from the built model's abstract params against L (4 d^2 + 3 d f + 2 d) + V d + d."""
  from configs import mdlm  # pylint: disable=g-import-not-at-top
  counts = {}
  for variant, shape in [("", (10, 1024, 2816)), ("small", (12, 768, 2048)),
                         ("tiny", (4, 256, 768))]:
    setup = trainer.build(mdlm.get_config(variant))
    counts[variant] = sum(a.size for a in jax.tree.leaves(setup.abstract_params))
    layers, d, f = shape
    v = setup.tokenizer.vocab_size
    assert counts[variant] == layers * (4 * d * d + 3 * d * f + 2 * d) + v * d + d
  assert 120e6 < counts[""] < 135e6 and 80e6 < counts["small"] < 90e6
  with pytest.raises(ValueError, match="use ':tiny', ':small' or nothing"):
    mdlm.get_config("huge")


@pytest.mark.slow
def test_params_restore_alone_onto_another_mesh(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  cfg = make_config({"train.steps": 2, "model.num_heads": 4, "train.ema_decay": 0.9})
  trainer.train(cfg, wd, log=quiet)
  one = trainer.build(cfg)
  params_one, step = checkpoint.restore_params(wd, one.abstract_params, use_ema=False)
  eight = trainer.build(cfg, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  params_eight, _ = checkpoint.restore_params(wd, eight.abstract_params, use_ema=False)
  ema_eight, _ = checkpoint.restore_params(wd, eight.abstract_params, use_ema=True)
  assert step == 2
  wq = params_eight["blocks"][0]["attn"]["wq"]
  assert len(wq.sharding.device_set) == 8 and wq.sharding.spec[0] == "fsdp"
  chex.assert_trees_all_equal(jax.device_get(params_eight), jax.device_get(params_one))
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ema_eight, params_eight)
  assert max(jax.tree.leaves(diff)) > 0, "the EMA item should differ from the raw params"


def test_trace_summary_splits_device_time_by_kind(tmp_path):
  """A hand-written Perfetto trace: host events and the device's derived lines are ignored,
  kernels are summed per HLO op over the traced steps and split into attention kernels,
  matmuls and the rest."""
  def x(pid, name, dur_us, op=None, tid=1):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur_us, "name": name,
            "args": {"hlo_op": op} if op else {}}
  def thread(tid, name):
    return {"ph": "M", "pid": 2, "tid": tid, "name": "thread_name", "args": {"name": name}}
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            thread(1, "Stream #13(Compute)"), thread(2, "XLA Modules"),
            x(1, "PjitFunction(step)", 99_000),
            x(2, "jit_step", 8000, tid=2),
            x(2, "sm90_xmma_gemm_bf16bf16", 3000, "dot.1"),
            x(2, "sm90_xmma_gemm_bf16bf16", 1000, "dot.1"),
            x(2, "cudnn_generated_fort_native_sdpa_sm90", 2000, "custom-call.3"),
            x(2, "loop_add_fusion", 1000, "fusion.7"),
            x(2, "loop_add_fusion", 1000, "command_buffer_1")]
  d = tmp_path / "plugins" / "profile" / "run"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tools"))
  import trace_summary  # pylint: disable=g-import-not-at-top
  s = trace_summary.summarize_trace(str(tmp_path), steps=2)
  assert s["device_ms_per_step"] == pytest.approx(4.0)
  assert s["share"] == pytest.approx({"matmul": 0.5, "attention": 0.25, "other": 0.25})
  assert s["top_ops_ms"][0] == ["dot.1", 2.0]
  assert ["loop_add_fusion", 0.5] in s["top_ops_ms"]  # named by its kernel inside a CUDA graph
  assert s["lines"] == {"Stream #13(Compute)": 4.0, "XLA Modules": 4.0}
