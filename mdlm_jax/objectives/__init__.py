"""Objective registry. `config.objective.name` picks one; its options live under `objective.`.

An objective builds its own modules from the shared backbone and exposes a pure loss; the
trainer never branches on which objective it runs.
"""
from __future__ import annotations

import ml_collections

from mdlm_jax.objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
  _REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get(name: str) -> type[Objective]:
  if name not in _REGISTRY:
    raise ValueError(f"objective.name={name!r} is unknown; choose one of {names()}.")
  return _REGISTRY[name]


def default_options(name: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, **get(name).defaults))


def validate_options(opts) -> None:
  """Refuses options that belong only to other objectives but were changed from their
  defaults (they would be silently ignored), then runs the objective's own checks."""
  cls = get(opts.name)
  for other in _REGISTRY.values():
    for key, default in other.defaults.items():
      if key not in cls.defaults and key in opts and opts[key] != default:
        raise ValueError(f"objective.{key}={opts[key]!r} is an option of objective "
                         f"{other.name!r}, not of {cls.name!r}; remove it or change "
                         "objective.name.")
  cls.validate(opts)


def create(config, tokenizer) -> Objective:
  return get(config.objective.name)(config, tokenizer)


# Objectives register themselves on import.
from mdlm_jax.objectives import ar  # noqa: E402,F401  pylint: disable=wrong-import-position
from mdlm_jax.objectives import mdlm  # noqa: E402,F401  pylint: disable=wrong-import-position
from mdlm_jax.objectives import mlm  # noqa: E402,F401  pylint: disable=wrong-import-position
from mdlm_jax.objectives import bst  # noqa: E402,F401  pylint: disable=wrong-import-position
from mdlm_jax.objectives import blm  # noqa: E402,F401  pylint: disable=wrong-import-position
from mdlm_jax.objectives import insertion  # noqa: E402,F401  pylint: disable=wrong-import-position
from mdlm_jax.objectives import bd3lm  # noqa: E402,F401  pylint: disable=wrong-import-position
