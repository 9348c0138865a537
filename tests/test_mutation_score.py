"""tools/mutation_score.py's bookkeeping: which mutants a group samples, how results are
counted, and which a `--pending` run names."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "mutation_score", os.path.join(ROOT, "tools", "mutation_score.py"))
ms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ms)

D = "mdlm_jax.objectives.insertion_decoding.x_fill__mutmut_"   # a 1-in-5 group
E = "mdlm_jax.evaluate.x_summarize__mutmut_"                    # an every-mutant group


def test_groups_sample_report_and_name_the_pending_mutants():
  codes = {D + "5": 1, D + "10": 0, D + "15": None, D + "16": None, D + "20": 36,
           E + "1": 0, E + "2": 3, "mdlm_jax.model.x_other__mutmut_5": None}
  assert ms.in_group(D + "10", 5, ["*insertion_decoding.x_fill"])
  assert not ms.in_group(D + "16", 5, ["*insertion_decoding.x_fill"])
  r = ms.report(codes)
  ins, err = r["insertion samplers"], r["standard errors"]
  assert (ins["generated"], ins["sampled"]) == (5, 4)       # 16 is not in the sample
  assert (ins["killed"], ins["survived"], ins["timeout"], ins["not run"]) == (1, 1, 1, 1)
  assert ins["survivors"] == [D + "10"]
  assert (err["sampled"], err["killed"], err["survived"]) == (2, 1, 1)
  # survivors and the sampled ones without a result; nothing outside the groups' samples
  assert ms.pending(codes) == sorted([D + "10", D + "15", E + "1"])
