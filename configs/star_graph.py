"""Star-graph path finding G(degree 2, path 5, 50 nodes) (Bachmann & Nagarajan 2024; the BST
paper's first experiment), one problem per row, at the CPU model shape of configs/default.py.

The graph and the query are the prompt and the path is the answer: `ar` and `bst` are trained
and scored on the path only (as in Bachmann & Nagarajan's setup), and every evaluation reports
the exact path accuracy of `eval.task_examples` validation problems, decoded greedily.

  python train.py --config=configs/star_graph.py:bst --workdir=workdirs/star_bst
  python train.py --config=configs/star_graph.py:ar --workdir=workdirs/star_ar
  python tools/evaluate.py --workdir=workdirs/star_bst --task=star_graph --examples=-1

Other graphs: --config.data.graph.degree=5 --config.data.graph.path_length=5 ... (the row
length and bst's answer window follow the graph).
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(objective: str = "bst"):
  c = default.cpu_config(objective or "bst")
  g = c.data.graph
  degree, length = g.get_ref("degree"), g.get_ref("path_length")
  # [BOS] 'uv|' per edge, '/', start, goal, '=' | the path, [EOS]
  row = 3 * degree * (length - 1) + length + 6
  c.data.update(name="star_graph", pack=False)
  c.data.seq_len = row
  c.model.max_seq_len = row
  c.train.update(steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100,
                 log_every_steps=100)
  c.checkpoint.every_steps = 500
  c.eval.update(every_steps=500, batches=4, sample_tokens=0, task_examples=500)
  if c.objective.name == "bst":  # '=', the path, EOS: the pairs of the answer only
    c.objective.answer_window = length + 2
  return config_lib.finalize(c)
