"""Validation curves of several runs in one PNG:

  python tools/plot.py --output=curves.png workdirs/ar workdirs/mdlm [--metric=eval/bits_per_byte]

The x axis is training tokens (steps x batch x seq_len from each run's config.json), so runs
with different batch shapes compare at equal data.

The sampling frontier, generative perplexity against the samples' entropy:

  python tools/plot.py --frontier --output=frontier.png ar.jsonl mdlm.jsonl bd3lm.jsonl

where each file holds the JSON lines of `tools/evaluate.py --task=gen_ppl` runs of one
workdir (one per temperature, step count or threshold): one curve per file, its points in
order of entropy. Needs matplotlib (`pip install matplotlib`, or the project's `[plot]` extra).
"""
import json
import sys

from absl import app
from absl import flags

from mdlm_jax import cli

_OUTPUT = flags.DEFINE_string("output", "curves.png", "PNG file to write.")
_METRIC = flags.DEFINE_string("metric", "eval/bits_per_byte", "metrics.jsonl key to draw.")
_TITLE = flags.DEFINE_string("title", None, "Plot title (default: the metric).")
_FRONTIER = flags.DEFINE_bool("frontier", False, "Draw gen-PPL against entropy from files of "
                              "`evaluate.py --task=gen_ppl` JSON lines instead of curves.")


def read_run(workdir: str, metric: str):
  """(label, tokens per step, [(step, value, stderr or None)]) of one workdir."""
  from mdlm_jax import storage  # pylint: disable=g-import-not-at-top
  wd = storage.path(workdir)
  cfg_path, rows_path = wd / "config.json", wd / "metrics.jsonl"
  for path in (cfg_path, rows_path):
    if not path.is_file():
      raise app.UsageError(f"{workdir}: no {path.name}; is it a training workdir?")
  cfg = json.loads(cfg_path.read_text())
  tokens = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
  points = []
  for line in rows_path.read_text().splitlines():
    if line.strip():
      row = json.loads(line)
      if metric in row:
        err = row.get(metric.replace("bits_per_byte", "bits_per_byte_stderr")
                      if "bits_per_byte" in metric else f"{metric}_stderr")
        points.append((row["step"], row[metric], err))
  label = f"{wd.name} ({cfg['objective']['name']})"
  return label, tokens, points


def read_frontier(path: str):
  """(label, [(entropy, gen_ppl, setting)]) of one file of gen_ppl JSON lines."""
  from mdlm_jax import storage  # pylint: disable=g-import-not-at-top
  file = storage.path(path)
  if not file.is_file():
    raise app.UsageError(f"{path}: no such file (JSON lines of evaluate.py --task=gen_ppl).")
  points, objective = [], None
  for line in file.read_text().splitlines():
    if line.strip().startswith("{"):
      row = json.loads(line)
      if "gen_ppl" in row:
        objective = row.get("objective")
        setting = ", ".join(f"{k}={row[k]}" for k in ("sampler", "temperature", "steps",
                                                       "threshold") if k in row)
        points.append((row["entropy"], row["gen_ppl"], setting))
  if not points:
    raise app.UsageError(f"{path}: no gen_ppl rows.")
  stem = file.name.rsplit(".", 1)[0]
  return f"{stem} ({objective})", sorted(points)


def plot_frontier(plt, files):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, pts in (read_frontier(f) for f in files):
    ax.plot([e for e, _, _ in pts], [g for _, g, _ in pts], marker="o", label=label)
  ax.set_xlabel("mean unigram entropy of a sample (nats)")
  ax.set_ylabel("generative perplexity (ar scorer)")
  ax.set_yscale("log")
  ax.set_title(_TITLE.value or "sampling frontier: lower and further right is better")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUTPUT.value, dpi=120)
  print(f"wrote {_OUTPUT.value} ({len(files)} curves)")


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give one or more workdirs (with --frontier: gen_ppl files).")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("tools/plot.py needs matplotlib: pip install matplotlib (or -e '.[plot]').")
  if _FRONTIER.value:
    return plot_frontier(plt, workdirs)
  runs = [read_run(w, _METRIC.value) for w in workdirs]
  empty = [w for w, (_, _, pts) in zip(workdirs, runs) if not pts]
  if empty:
    raise app.UsageError(f"no {_METRIC.value!r} rows in {', '.join(empty)}.")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, tokens, pts in runs:
    x = [s * tokens for s, _, _ in pts]
    y = [v for _, v, _ in pts]
    line, = ax.plot(x, y, marker="o", label=label)
    if all(e is not None for _, _, e in pts):
      ax.fill_between(x, [v - 2 * e for _, v, e in pts], [v + 2 * e for _, v, e in pts],
                      color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel(_METRIC.value)
  ax.set_title(_TITLE.value or _METRIC.value)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUTPUT.value, dpi=120)
  print(f"wrote {_OUTPUT.value} ({len(runs)} runs)")


if __name__ == "__main__":
  cli.run(main)
