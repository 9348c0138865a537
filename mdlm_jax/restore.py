"""Rebuild a trained model from its workdir on any mesh (for sampling and evaluation)."""
from __future__ import annotations

from mdlm_jax import checkpoint
from mdlm_jax import config as config_lib
from mdlm_jax import run_record


def load(workdir: str, *, mesh_overrides: dict | None = None, use_ema: bool = True,
         step: int | None = None, config_overrides: dict | None = None):
  """Returns (setup, params, step) with params restored onto the mesh given by the saved
  config with `mesh_overrides` applied (default: every device on the tensor axis)."""
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  config = config_lib.from_dict(run_record.load_config_dict(workdir))
  mesh = {"data": 1, "fsdp": 1, "tensor": -1}
  mesh.update(mesh_overrides or {})
  with config.unlocked():
    config.mesh.update(mesh)
    for key, value in (config_overrides or {}).items():
      section, name = key.split(".", 1)
      config[section][name] = value
  setup = trainer.build(config)
  params, restored_step = checkpoint.restore_params(workdir, setup.abstract_params,
                                                    use_ema=use_ema, step=step)
  return setup, params, restored_step
