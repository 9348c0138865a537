"""Star-graph path finding G(degree 2, path 5, 50 nodes) (Bachmann & Nagarajan 2024; the BST
paper's first experiment), one problem per row: 6 layers of d_model 128, 4 heads, a constant
learning rate of 1e-3 after 200 warmup steps, 6000 steps of 64 problems (about 1 h for `bst` on
one CPU core).

Why this recipe (docs/results.md, "Star graph"): `bst` leaves the 50% plateau (the model
follows one of the two arms) only once its backward predictions have been learned, at a step
that depends on the seed (2500 to 4500 here). A cosine decay tied that escape to the budget,
and four layers (three look-ups back from the goal, plus one to bind each edge) left it slow
or partial for some seeds.

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
  c.model.update(num_layers=6, d_model=128, mlp_dim=384)
  c.train.update(steps=6000, batch_size=64, learning_rate=1e-3, warmup_steps=200,
                 schedule="constant", log_every_steps=100)
  c.checkpoint.every_steps = 500
  c.eval.update(every_steps=500, batches=4, sample_tokens=0, task_examples=500)
  if c.objective.name == "bst":  # '=', the path, EOS: the pairs of the answer only
    c.objective.answer_window = length + 2
  return config_lib.finalize(c)
