"""What a person sees from train.py and the tools: a user error (a config key or value, a flag,
a path, a workdir) is one line naming the setting and the fix, exit code 2, no traceback;
`--verbose` or MDLM_JAX_VERBOSE=1 shows the traceback. Also the default config's path,
wherever the command is run from."""
from __future__ import annotations

import ast
import os
import re
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")
_OURS = tuple(os.path.join(ROOT, d) for d in ("mdlm_jax", "tools", "configs", "train.py"))

flags.DEFINE_bool("verbose", False, "Show the traceback of a user error.")


def define_config(default: str = DEFAULT_CONFIG):
  """The --config flag (a config file, `FILE:VARIANT`, and --config.KEY=VALUE overrides)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # config files import `configs.default`
  try:  # overrides already on the command line are applied here, at definition
    return config_flags.DEFINE_config_file("config", default, "Config file.", lock_config=True)
  except (AttributeError, KeyError) as e:
    if _verbose():
      raise
    fail(_override_error(e, sys.argv))


def define_threshold_flags():
  """--threshold and --threshold_fallback (threshold decoding of llada and bd3lm), the same
  in every tool."""
  threshold = flags.DEFINE_float(
      "threshold", 0.0, "llada and bd3lm: commit every masked position (of the current block) "
      "whose top probability exceeds it, at least one per call (Fast-dLLM); 0: off.")
  fallback = flags.DEFINE_enum(
      "threshold_fallback", "confident", ["confident", "random", "left_to_right", "dilated"],
      "bd3lm with --threshold: the order that tops a call up to ceil(masked / steps left) "
      "positions when fewer pass (one when none passes, with steps = block size): the most "
      "confident first (Fast-dLLM's), uniformly random, reading order, or the dilated order.")
  return threshold, fallback


def define_draw_flags(temperature: float = 1.0):
  """--temperature, --top_k, --top_p and --min_p (every sampler's draw, `sampling.draw`), the
  same in every tool; returns a function giving them, checked, as the samplers' keywords."""
  temp = flags.DEFINE_float("temperature", temperature, "Sampling temperature (0: greedy).")
  top_k = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
  top_p = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
  min_p = flags.DEFINE_float("min_p", 0.0, "Keep tokens with prob >= min_p * max prob (0: off).")

  def options() -> dict:
    if temp.value < 0 or not 0 < top_p.value <= 1 or not 0 <= min_p.value < 1 or top_k.value < 0:
      raise app.UsageError("need --temperature >= 0, 0 < --top_p <= 1, 0 <= --min_p < 1, "
                           "--top_k >= 0.")
    return dict(temperature=temp.value, top_k=top_k.value, top_p=top_p.value, min_p=min_p.value)
  return options


def define_block_cache_flags():
  """--dual_cache and --prefix_cache (Fast-dLLM's block caches of the llada sampler); returns
  a function giving the chosen kind (None, 'prefix' or 'dual')."""
  dual = flags.DEFINE_bool("dual_cache", False, "llada with --block_length: Fast-dLLM's dual "
                           "KV cache (the canvas encoded whole once per block, then the block "
                           "alone; an approximation).")
  prefix = flags.DEFINE_bool("prefix_cache", False, "llada with --block_length: Fast-dLLM's "
                             "prefix KV cache (the finished blocks cached, the block and "
                             "everything after it encoded at every step; an approximation).")

  def kind():
    if dual.value and prefix.value:
      raise app.UsageError("--dual_cache and --prefix_cache: choose one.")
    return "dual" if dual.value else "prefix" if prefix.value else None
  return kind


def _verbose() -> bool:
  if os.environ.get("MDLM_JAX_VERBOSE", "") not in ("", "0"):
    return True
  return "--verbose" in sys.argv or (flags.FLAGS.is_parsed() and flags.FLAGS.verbose)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _raised_by_us(e: BaseException) -> bool:
  """A ValueError raised by this project's own checks (not deep inside a library)."""
  tb, last = e.__traceback__, None
  while tb is not None:
    last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
  return last is not None and os.path.abspath(last).startswith(_OURS)


def _override_error(e: Exception, argv: list[str]) -> str:
  """ml_collections' message for a --config.KEY that names no key, e.g.
  `'\\'step\\'\\nDid you mean "steps" instead of "step"?'`, as one line naming the flag."""
  text = str(e)
  try:
    text = ast.literal_eval(text) if text[:1] in "'\"" else text
  except (ValueError, SyntaxError):
    pass
  text = " ".join(str(text).split())
  m = re.match(r"'([^']+)'", text)
  key = m.group(1) if m else None
  names = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  hits = [n for n in names if key and key in n[len("--config."):].split(".")]
  where = hits[0] if hits else "--config"
  hint = text[m.end():].strip() if m else text
  return f"{where}: no such config key {key!r}" + (f" ({hint})" if hint else "") + \
      "; see the keys in docs/training.md or the config file."


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _verbose():
      raise
    fail(f"{e}")
  except (AttributeError, KeyError) as e:  # a --config.KEY that names no key
    if _verbose():
      raise
    fail(_override_error(e, argv))
  except (TypeError, ValueError) as e:  # a --config.KEY=VALUE of the wrong type
    if _verbose():
      raise
    fail(f"a --config override: {' '.join(str(e).split())}")
  return argv


def run(main) -> None:
  """`absl.app.run(main)` with user errors reported in one line, exit code 2."""

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      if _verbose():
        raise
      fail(str(e))
    except (ValueError, FileNotFoundError) as e:
      if _verbose() or not _raised_by_us(e):
        raise
      fail(str(e))

  app.run(wrapped, flags_parser=_parse)
