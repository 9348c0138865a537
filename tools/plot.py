"""Validation curves of several runs in one PNG:

  python tools/plot.py --output=curves.png workdirs/ar workdirs/mdlm [--metric=eval/bits_per_byte]

The x axis is training tokens (steps x batch x seq_len from each run's config.json), so runs
with different batch shapes compare at equal data. Needs matplotlib (`pip install
matplotlib`, or the project's `[plot]` extra).
"""
import json
import sys

from absl import app
from absl import flags

from mdlm_jax import cli

_OUTPUT = flags.DEFINE_string("output", "curves.png", "PNG file to write.")
_METRIC = flags.DEFINE_string("metric", "eval/bits_per_byte", "metrics.jsonl key to draw.")
_TITLE = flags.DEFINE_string("title", None, "Plot title (default: the metric).")


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


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give one or more workdirs.")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("tools/plot.py needs matplotlib: pip install matplotlib (or -e '.[plot]').")
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
