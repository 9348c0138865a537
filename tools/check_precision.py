"""Checks a config's loss and gradient in low precision against float32 on the same params
and batch (for GPUs/TPUs: bf16 matmuls, the cuDNN fused attention kernel).

  python tools/check_precision.py --config=configs/mdlm.py --config.train.batch_size=8

For each variant (model.dtype, model.attention) it prints one JSON line with the loss, the
relative error of the loss and of the whole gradient, ||g - g_ref|| / ||g_ref||, against the
float32 run with XLA's attention (its matmuls at full float32 precision). bf16 operands land
between 1e-3 and 1e-2; NaN never passes.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mdlm_jax import cli  # noqa: E402
from mdlm_jax import distributed  # noqa: E402

_CONFIG = cli.define_config()
_VARIANTS = flags.DEFINE_list("variants",
                              ["bfloat16:cudnn", "bfloat16:cudnn_packed", "bfloat16:xla"],
                              "dtype:attention pairs compared with float32:xla.")
_DOC_LEN = flags.DEFINE_integer("doc_len", 128, "Mean document length of the packed rows.")


def main(argv):
  del argv
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  base = _CONFIG.value

  def grad_of(dtype, attention, params=None):
    cfg = base.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model.dtype, cfg.model.attention = dtype, attention
    setup = trainer.build(cfg)
    params = setup.init_params() if params is None else params
    batch = pipeline.synthetic_batch(np.random.default_rng(0), cfg.train.batch_size,
                                  cfg.data.seq_len, setup.tokenizer.vocab_size, _DOC_LEN.value)
    fn = lambda p: setup.objective.loss(nnx.merge(setup.graphdef, p), batch,
                                        jax.random.key(1))[0]
    loss, grad = jax.jit(jax.value_and_grad(fn))(params)
    return params, float(loss), grad

  flat = lambda g: jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree.leaves(g)])
  # float32 matmuls at full precision: XLA's default on GPUs since Ampere rounds their operands
  # to TF32 (10 mantissa bits), which would make the reference itself a low-precision run
  with jax.default_matmul_precision("highest"):
    params, ref_loss, ref_grad = grad_of("float32", "xla")
  ref = flat(ref_grad)
  print(json.dumps({"variant": "float32:xla", "loss": ref_loss,
                    "device": jax.devices()[0].device_kind}), flush=True)
  for variant in _VARIANTS.value:
    dtype, attention = variant.split(":")
    try:
      _, loss, grad = grad_of(dtype, attention, params)
    except Exception as e:  # pylint: disable=broad-except
      print(json.dumps({"variant": variant, "error": f"{type(e).__name__}: {e}"[:500]}))
      continue
    g = flat(grad)
    print(json.dumps({
        "variant": variant, "loss": loss, "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
        "grad_rel_err": float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)),
        "finite": bool(np.isfinite(loss) and jnp.isfinite(g).all())}), flush=True)


if __name__ == "__main__":
  cli.run(main)
