"""Sample from a trained model: python tools/sample.py --workdir=DIR [--prefix=TEXT] ...

Restores the latest params (their EMA when the run kept one) onto the local devices and calls
the objective's sampler.
- `ar`: continues --prefix (alias --prompt) with temperature, top-k, top-p, min-p, a KV cache
  and EOS stop; trained with objective.fim_rate > 0 it also fills between --prefix and
  --suffix (prefix-suffix-middle prompt).
- `bst`: continues --prefix towards --suffix (none: the empty suffix) with F's KV cache and
  the suffix encoded once; --num_candidates=K keeps the best of K by the backward head.
- `mdlm`: fills masked positions; the canvas is --prefix, then --max_new_tokens masks, then
  --suffix, or a --template whose `<mask:N>` spans are N masked tokens, e.g.
    --template='def f(<mask:12>):'
  with --sampler=ancestral|confidence|llada, --steps, --grid (ancestral), --remask, --critic,
  --critic_noise (confidence), --block_length, --cfg_scale, --remasking (llada); --show_steps=K prints the canvas at K evenly spaced steps (masks shown as `_`).
- `blm`: fills between --prefix and --suffix, or every `<blank>` of a --template with any
  number of tokens, e.g. --template='def <blank>(path):'.
- `bd3lm`: continues --prefix block by block with the finished blocks' keys and values
  cached, up to --max_new_tokens (EOS ends a sample earlier), --steps calls per block at most
  (default: the block size); --sampler=ancestral (the default), random (one uniformly chosen
  token per call), left_to_right (the leftmost), dilated (far-apart positions together: 0, 2,
  then 1, 3 in a block of 4), confidence, or threshold (with --threshold;
  also --sampler=bd3lm --threshold=0.9).
- `insertion`: inserts tokens between --prefix and --suffix, --sampler=parallel (every open
  slot at once; the default after objective.finalization=slot) or sequential (one insertion
  per step; the default after finalization=sequence, which trains no per-slot end).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from mdlm_jax import cli  # noqa: E402
from mdlm_jax import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_PROMPT = flags.DEFINE_string("prefix", "", "Text before the generated span.")
flags.DEFINE_alias("prompt", "prefix")
_SUFFIX = flags.DEFINE_string("suffix", None, "Text after the generated span (mdlm, bst, "
                               "ar trained with objective.fim_rate > 0).")
_MIDDLE_END = flags.DEFINE_enum(
    "middle_end", "best", ["best", "fixed"], "bst with --suffix: 'best' ends each middle "
    "where the completed text (middle + suffix) is most likely given the prefix; 'fixed' keeps "
    "--max_new_tokens tokens.")
_CANDIDATES = flags.DEFINE_integer("num_candidates", 1, "bst: middles drawn per sample; the "
                                   "one the backward head finds most likely is kept.")
_TEMPLATE = flags.DEFINE_string("template", None, "Text with <mask:N> spans to fill (mdlm), "
                                "or with <blank>s each filled with any number of tokens (blm).")
_SAMPLER = flags.DEFINE_string("sampler", None, "mdlm: ancestral (default), confidence, llada; "
                               "insertion: parallel (default), sequential; bd3lm: ancestral "
                               "(default), random, left_to_right, dilated, confidence, "
                               "threshold.")
_THRESHOLD, _FALLBACK = cli.define_threshold_flags()
_STEPS = flags.DEFINE_integer("steps", None, "mdlm: denoising steps (default: masked count).")
_BLOCK = flags.DEFINE_integer("block_length", 0, "llada: semi-autoregressive block (0: one).")
_BLOCK_CACHE = cli.define_block_cache_flags()
_CFG = flags.DEFINE_float("cfg_scale", 0.0, "llada: classifier-free guidance scale w.")
_REMASKING = flags.DEFINE_string("remasking", "low_confidence", "llada: low_confidence|random.")
_GRID = flags.DEFINE_string("grid", "uniform", "ancestral: time grid, uniform|cosine.")
_REMASK = flags.DEFINE_bool("remask", False, "confidence: earlier choices may be remasked.")
_CRITIC = flags.DEFINE_bool("critic", False, "confidence: rank by the token critic's scores.")
_CRITIC_NOISE = flags.DEFINE_float("critic_noise", 1.0, "confidence: annealed Gumbel scale.")
_SHOW = flags.DEFINE_integer("show_steps", 0, "mdlm: print the canvas at this many steps.")
_NUM = flags.DEFINE_integer("num_samples", 2, "Samples to draw.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate at most.")
_DRAW = cli.define_draw_flags(temperature=0.8)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA params when the run kept them.")


def check_sampling_flags():
  if _NUM.value < 1 or _MAX_NEW.value < 1:
    raise app.UsageError("--num_samples and --max_new_tokens must be >= 1.")
  _DRAW()


def main(argv):
  del argv
  check_sampling_flags()
  distributed.initialize(logging.ERROR)
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import restore, tokenizers  # pylint: disable=g-import-not-at-top

  setup, params, step = restore.load(_WORKDIR.value, use_ema=_EMA.value, step=_STEP.value)
  tok = setup.tokenizer
  name = setup.config.objective.name
  if hasattr(setup.objective, "sample"):
    return sample_canvas(setup, params, step)
  if hasattr(setup.objective, "fill") and _TEMPLATE.value is not None:
    return fill_blanks(setup, params, step)
  decoding = None
  sampler_flag = _SAMPLER.value
  if name == "bd3lm" and sampler_flag in (None, "bd3lm"):
    sampler_flag = "threshold" if _THRESHOLD.value > 0 else None
  if setup.objective.samplers:  # insertion: parallel or sequential decoding; bd3lm's rules
    try:
      decoding = setup.objective.resolve_sampler(sampler_flag)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  for flag, value in (("--template", _TEMPLATE.value),
                      ("--sampler", None if setup.objective.samplers else _SAMPLER.value),
                      ("--steps", None if name == "bd3lm" else _STEPS.value)):
    if value is not None:
      raise app.UsageError(f"{flag} needs a model that fills masked positions (objective "
                           f"mdlm; blm takes --template with <blank>); {_WORKDIR.value} holds "
                           f"objective {name!r}.")
  if _SUFFIX.value is not None and not setup.objective.accepts_suffix:
    hint = (" (an ar model reads a suffix only when trained with objective.fim_rate > 0)"
            if name == "ar" else "")
    raise app.UsageError(f"--suffix: objective {name!r} of {_WORKDIR.value} cannot condition on "
                         f"a suffix{hint}; use a bst, blm, insertion, mdlm or FIM-trained ar "
                         "model.")
  if _CANDIDATES.value != 1 and name != "bst":
    raise app.UsageError("--num_candidates needs a bst model (its backward head ranks them).")
  if _CANDIDATES.value < 1:
    raise app.UsageError(f"--num_candidates={_CANDIDATES.value} must be >= 1.")
  prompt = np.concatenate([[tokenizers.BOS], tok.encode(_PROMPT.value)]).astype(np.int32)
  suffix = tok.encode(_SUFFIX.value or "").astype(np.int32)
  limit = setup.config.model.max_seq_len
  width = setup.objective.canvas_width(len(prompt), len(suffix), _MAX_NEW.value)
  if width > limit:
    raise app.UsageError(f"prefix ({len(prompt)} tokens), suffix ({len(suffix)}) and "
                         f"--max_new_tokens={_MAX_NEW.value} make {name} rows of {width} "
                         f"positions, over the model's limit model.max_seq_len={limit}; shorten "
                         "them.")
  prompts = np.tile(prompt, (_NUM.value, 1))
  options = dict(max_new_tokens=_MAX_NEW.value, **_DRAW())
  if _SUFFIX.value is not None:
    options["suffix_BxS"] = np.tile(suffix, (_NUM.value, 1))
  if name == "bst":
    options["num_candidates"] = _CANDIDATES.value
    options["end"] = _MIDDLE_END.value
  if name == "bd3lm":
    options.update(sampler=decoding, steps=_STEPS.value, fallback=_FALLBACK.value,
                   threshold=_THRESHOLD.value if _THRESHOLD.value > 0 else 0.9)
  elif decoding:
    options["decoding"] = decoding

  @functools.partial(jax.jit)
  def run(params, prompts, rng):
    return setup.objective.generate(nnx.merge(setup.graphdef, params), prompts, rng, **options)

  out = np.asarray(jax.device_get(run(params, prompts, jax.random.key(_SEED.value))))
  print(f"# {setup.config.objective.name} model from {_WORKDIR.value}, step {step}")
  for i, row in enumerate(out):
    middle = tok.decode_until_eos(row[len(prompt):])
    print(f"--- sample {i} ---\n{_PROMPT.value}{middle}{_SUFFIX.value or ''}")


def parse_template(template: str, tok):
  """'a<mask:3>b' -> ids of 'a', 3 MASKs, ids of 'b' (a list of int32 arrays)."""
  import re  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  parts, pos = [], 0
  for m in re.finditer(r"<mask:(\d+)>", template):
    parts.append(tok.encode(template[pos:m.start()]))
    parts.append(np.full(int(m.group(1)), tokenizers.MASK, np.int32))
    pos = m.end()
  parts.append(tok.encode(template[pos:]))
  if not any(len(p) and (p == tokenizers.MASK).all() for p in parts[1::2]):
    raise app.UsageError("--template has no <mask:N> span with N >= 1 to fill.")
  return parts


def fill_blanks(setup, params, step):
  """Blank-language-model infilling: every <blank> of --template becomes any number of tokens
  (the canvas grows up to --max_new_tokens more than the template)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  if _PROMPT.value or _SUFFIX.value:
    raise app.UsageError("give either --template or --prefix/--suffix, not both.")
  texts = _TEMPLATE.value.split("<blank>")
  if len(texts) < 2:
    raise app.UsageError("--template has no <blank> to fill.")
  tok, limit = setup.tokenizer, setup.config.model.max_seq_len
  parts = [[tokenizers.BOS]]
  for i, text in enumerate(texts):
    parts += [tok.encode(text)] + ([[tokenizers.BLANK]] if i < len(texts) - 1 else [])
  canvas = np.concatenate(parts + [[tokenizers.EOS]]).astype(np.int32)
  width = min(len(canvas) + _MAX_NEW.value, limit)
  if len(canvas) > width:
    raise app.UsageError(f"the template holds {len(canvas)} tokens (with BOS and EOS), more "
                         f"than the model's limit model.max_seq_len={limit}; shorten it.")
  rows = np.full((_NUM.value, width), tokenizers.PAD, np.int32)
  rows[:, :len(canvas)] = canvas

  @jax.jit
  def run(params, rows, rng):
    return setup.objective.fill(nnx.merge(setup.graphdef, params), rows, rng, **_DRAW())

  out, info = jax.device_get(run(params, rows, jax.random.key(_SEED.value)))
  print(f"# {setup.config.objective.name} model from {_WORKDIR.value}, step {step}; "
        f"{len(texts) - 1} blanks, up to {width - len(canvas)} new tokens, "
        f"{int(info['calls'])} network calls")
  for i, row in enumerate(np.asarray(out)):
    print(f"--- sample {i} ---\n{tok.decode_until_eos(row[1:])}")


def sample_canvas(setup, params, step):
  """Masked-diffusion sampling of a canvas built from the flags."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  tok, limit = setup.tokenizer, setup.config.data.seq_len
  try:
    sampler = setup.objective.resolve_sampler(_SAMPLER.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if _TEMPLATE.value is not None:
    if _PROMPT.value or _SUFFIX.value:
      raise app.UsageError("give either --template or --prefix/--suffix, not both.")
    parts = parse_template(_TEMPLATE.value, tok)
  else:
    parts = [tok.encode(_PROMPT.value), np.full(_MAX_NEW.value, tokenizers.MASK, np.int32),
             tok.encode(_SUFFIX.value or "")]
  canvas = np.concatenate([[tokenizers.BOS], *parts]).astype(np.int32)
  if len(canvas) > limit:
    raise app.UsageError(
        f"the canvas holds {len(canvas)} tokens (BOS, the given text and the masked spans) but "
        f"the model was trained on data.seq_len={limit}; shorten the text or the masked spans.")
  masks = int((canvas == tokenizers.MASK).sum())
  steps = masks if _STEPS.value is None else _STEPS.value
  if steps < 1:
    raise app.UsageError(f"--steps={steps} must be >= 1.")
  options = dict(_DRAW(), snapshots=min(_SHOW.value, steps))
  if sampler == "llada":
    options.update(block_length=_BLOCK.value, cfg_scale=_CFG.value, remasking=_REMASKING.value,
                   threshold=_THRESHOLD.value, kv_cache=_BLOCK_CACHE())
  elif sampler == "ancestral":
    options.update(grid=_GRID.value)
  else:
    options.update(remask=_REMASK.value, critic=_CRITIC.value, critic_noise=_CRITIC_NOISE.value)
  rows = np.tile(canvas, (_NUM.value, 1))

  @jax.jit
  def run(params, rows, rng):
    model = nnx.merge(setup.graphdef, params)
    return setup.objective.sample(model, rows, rng, sampler=sampler, steps=steps, **options)

  out, info = jax.device_get(run(params, rows, jax.random.key(_SEED.value)))
  print(f"# {setup.config.objective.name} model from {_WORKDIR.value}, step {step}; sampler "
        f"{sampler}, {steps} steps, {masks} masked tokens, {int(info['calls'])} network calls")
  for i, row in enumerate(np.asarray(out)):
    print(f"--- sample {i} ---")
    if info["history"] is not None:
      for k, snap in enumerate(np.asarray(info["history"])[:, i]):
        print(f"[{k + 1}/{options['snapshots']}] {tok.decode_with_specials(snap[1:])}")
    print(tok.decode(row[1:]))


if __name__ == "__main__":
  cli.run(main)
