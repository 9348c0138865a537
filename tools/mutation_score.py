"""Mutation score of the samplers, the bounds and the standard errors (mutmut; not in CI).

  pip install -e '.[test,mutation]'
  python tools/mutation_score.py                  # run every sampled mutant, then report
  python tools/mutation_score.py --pending        # only those not run yet or that survived
  python tools/mutation_score.py --report_only    # report what mutants/ holds

mutmut mutates the files `[tool.mutmut] only_mutate` names (pyproject.toml) and runs, for each
mutant, the tests of `pytest_add_cli_args_test_selection` that reach the mutated function.
GROUPS below names the functions scored, by mutmut's mutant names (`module.x_function` or
`module.xǁClassǁmethod`). A group with `every=1` runs all its mutants; `every=5` runs the
mutants numbered 5, 10, 15, ... of each function: a systematic one-in-five sample, spread
over every line of every function, so the score estimates the whole group's at a fifth of
the cost (about 6 to 10 s a mutant on 2 cores). The report gives killed / run per group, with
timeouts (the mutant made a test run past mutmut's CPU limit, e.g. an endless loop) counted
as killed and listed apart, and writes the survivors to --output for review. mutmut reruns
every mutant it is given by name, so a plain run redoes the whole sample; `--pending` (after
a first run, e.g. once tests were added) names only the sampled mutants without a result or
that survived, as mutants/ records them.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

O = "mdlm_jax.objectives."
# group -> (sampling period, mutant-name patterns without the __mutmut_N suffix)
GROUPS = {
    "standard errors": (1, [O + "base.x_bound_error_sums", "mdlm_jax.evaluate.x_summarize",
                            "mdlm_jax.evaluate.x_format_line"]),
    "bounds": (1, [O + "mdlm_likelihood.x_*", O + "mdlm_schedule.x_mask_prob",
                   O + "mdlm_schedule.x_elbo_weight", O + "mdlm_schedule.x_sample_times",
                   O + "mdlm_schedule.x_maskable", O + "mdlm_schedule.x_choose_masked"]),
    "draw and ar sampler": (5, ["mdlm_jax.sampling.x_*"]),
    "masked-diffusion samplers": (5, [O + "mdlm_sampling.x_*", O + "mdlm_sampling.xǁBlockCacheǁ*",
                                      O + "base.x_rank_in_row", O + "base.x_choose_count"]),
    "insertion samplers": (5, [O + "insertion_decoding.x_parallel_action",
                               O + "insertion_decoding.x_sequential_action",
                               O + "insertion_decoding.x_fill"]),
    "bst sampler and middle scores": (5, [O + "bst.xǁBSTǁgenerate", O + "bst.xǁBSTǁbest_cut",
                                          O + "bst.xǁBSTǁmiddle_log_likelihood",
                                          O + "bst.xǁBSTǁcompleted_log_likelihood",
                                          O + "bst.x__until_eos", O + "bst.xǁ_ForwardHeadǁ*"]),
    "blm sampler": (5, [O + "blm.xǁBLMǁgenerate", O + "blm.xǁBLMǁfill", O + "blm.x_one_blank"]),
    "block diffusion loss and sampler": (5, [O + "bd3lm.x_*", O + "bd3lm.xǁBD3LMǁ*",
                                             O + "bd3lm_sampling.x_*"]),
}
KILLED, SURVIVED, TIMEOUT = {1, 3}, {0}, {36, 24, -24, 152, 255}


def run_patterns() -> list[str]:
  """mutmut name patterns selecting every group's sample."""
  out = []
  for every, patterns in GROUPS.values():
    suffix = "*" if every == 1 else "*[05]" if every == 5 else None
    if suffix is None:
      raise ValueError(f"sampling period {every} must be 1 or 5")
    out += [p + "__mutmut_" + suffix for p in patterns]
  return out


def exit_codes() -> dict[str, int | None]:
  """Every generated mutant's exit code (None: not run) from mutmut's per-file records."""
  codes = {}
  for meta in glob.glob(os.path.join(ROOT, "mutants", "**", "*.py.meta"), recursive=True):
    with open(meta) as f:
      codes.update(json.load(f).get("exit_code_by_key", {}))
  return codes


def pending(codes: dict[str, int | None]) -> list[str]:
  """The sampled mutants of every group not run yet or that survived."""
  return sorted(n for n, code in codes.items()
                if (code is None or code in SURVIVED)
                and any(in_group(n, every, patterns) for every, patterns in GROUPS.values()))


def in_group(name: str, every: int, patterns: list[str]) -> bool:
  base, _, number = name.rpartition("__mutmut_")
  return (any(fnmatch.fnmatchcase(base, p) for p in patterns)
          and int(number) % every == 0)


def report(codes: dict[str, int | None]) -> dict:
  """Per group: generated, run, killed, timeouts, survivors, not run."""
  out = {}
  for group, (every, patterns) in GROUPS.items():
    names = sorted(n for n in codes if in_group(n, 1, patterns))
    picked = [n for n in names if in_group(n, every, patterns)]
    c = collections.Counter()
    survivors = []
    for n in picked:
      code = codes[n]
      kind = ("not run" if code is None else "killed" if code in KILLED else
              "timeout" if code in TIMEOUT else "survived" if code in SURVIVED else f"exit {code}")
      c[kind] += 1
      if kind == "survived":
        survivors.append(n)
    out[group] = {"generated": len(names), "sampled": len(picked), "every": every,
                  **dict(c), "survivors": survivors}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--max_children", type=int, default=os.cpu_count() or 2)
  ap.add_argument("--report_only", action="store_true")
  ap.add_argument("--pending", action="store_true",
                  help="run only the sampled mutants not run yet or that survived")
  ap.add_argument("--output", default=os.path.join(ROOT, "mutants", "score.json"))
  args = ap.parse_args()
  if not args.report_only:
    names = pending(exit_codes()) if args.pending else run_patterns()
    if args.pending and not names:
      print("no pending mutants")
    else:
      cmd = [os.path.join(os.path.dirname(sys.executable), "mutmut"), "run",
             "--max-children", str(args.max_children), *names]
      # every mutant's tests compile mostly the programs the others did: one persistent XLA
      # cache for the run (a mutated function traces to a different program, a new key)
      env = dict(os.environ)
      env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, "mutants", "xla_cache"))
      subprocess.run(cmd, cwd=ROOT, check=False, env=env)
  codes = exit_codes()
  if not codes:
    sys.exit("no mutants/ records: run without --report_only first")
  result = report(codes)
  total = collections.Counter()
  for group, r in result.items():
    done = r["sampled"] - r.get("not run", 0)
    detected = r.get("killed", 0) + r.get("timeout", 0)
    total.update(done=done, detected=detected)
    print(f"{group:32s} {detected:4d} / {done:4d} killed ({r.get('timeout', 0)} by timeout)"
          f"  {r.get('survived', 0)} survived  {r.get('not run', 0)} not run"
          f"  [1 in {r['every']} of {r['generated']}]")
    for name in r["survivors"]:
      print("    survived:", re.sub(r"^mdlm_jax\.", "", name))
  print(f"{'all':32s} {total['detected']:4d} / {total['done']:4d} killed")
  with open(args.output, "w") as f:
    json.dump(result, f, indent=1)
  print("survivors and counts:", args.output, "| one mutant: mutmut show NAME")


if __name__ == "__main__":
  main()
