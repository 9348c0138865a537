"""Star-graph path finding G(degree 2, path 5, 50 nodes) (Bachmann & Nagarajan 2024; the BST
paper's first experiment), one problem per row, at the CPU model shape of configs/default.py.

  python train.py --config=configs/star_graph.py:bst --workdir=workdirs/star_bst
  python train.py --config=configs/star_graph.py:ar --workdir=workdirs/star_ar
  python tools/evaluate.py --workdir=workdirs/star_bst --task=star_graph --examples=-1

Other graphs: --config.data.graph.degree=5 --config.data.graph.path_length=5 ...
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(objective: str = "bst"):
  c = default.cpu_config(objective or "bst")
  c.data.update(name="star_graph", pack=False, seq_len=40)  # 8 edges * 3 + 4 + 5 + BOS/EOS
  c.model.max_seq_len = 64
  c.train.update(steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100,
                 log_every_steps=100)
  c.checkpoint.every_steps = 500
  c.eval.update(every_steps=500, batches=4, sample_tokens=0)
  return config_lib.finalize(c)
