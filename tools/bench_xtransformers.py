"""Reference figures from x-transformers (PyTorch, CPU) at the shape of tools/bench.py.

Not a project dependency: run it from a separate environment holding torch and
x-transformers, next to tools/bench.py on the same machine, e.g.

  python -m venv /tmp/xt && /tmp/xt/bin/pip install torch x-transformers
  /tmp/xt/bin/python tools/bench_xtransformers.py --wrapper=ar --dim=256 --depth=4 --heads=4 \
      --seq_len=256 --batch_size=16

Prints one JSON line with tokens_per_s and step_time_s of a full training step
(forward, backward, AdamW update). The feed-forward is a SwiGLU of width ff_mult * dim and
attention uses rotary embeddings and RMSNorm, as in this project's backbone.
"""
import argparse
import json
import time

import torch
from x_transformers import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--wrapper", default="ar", choices=["ar", "nar", "bst"])
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--ff_mult", type=float, default=3)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--vocab", type=int, default=264)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=0)
  a = p.parse_args()
  if a.threads:
    torch.set_num_threads(a.threads)
  layers = dict(dim=a.dim, depth=a.depth, heads=a.heads, rotary_pos_emb=True, ff_glu=True,
                ff_swish=True, ff_mult=a.ff_mult, use_rmsnorm=True)
  if a.wrapper == "ar":
    net = TransformerWrapper(num_tokens=a.vocab, max_seq_len=a.seq_len + 1,
                             attn_layers=Decoder(**layers))
    model = AutoregressiveWrapper(net)
    data = torch.randint(8, a.vocab, (a.batch_size, a.seq_len + 1))
    tokens = a.batch_size * a.seq_len
  elif a.wrapper == "nar":
    from x_transformers import NonAutoregressiveWrapper  # pylint: disable=g-import-not-at-top
    net = TransformerWrapper(num_tokens=a.vocab + 1, max_seq_len=a.seq_len,
                             attn_layers=Encoder(**layers))
    model = NonAutoregressiveWrapper(net, mask_id=a.vocab)
    data = torch.randint(8, a.vocab, (a.batch_size, a.seq_len))
    tokens = a.batch_size * a.seq_len
  else:
    from x_transformers import BeliefStateWrapper  # pylint: disable=g-import-not-at-top
    net = TransformerWrapper(num_tokens=a.vocab, max_seq_len=a.seq_len,
                             attn_layers=Decoder(**layers))
    model = BeliefStateWrapper(forward_decoder=net)
    data = torch.randint(8, a.vocab, (a.batch_size, a.seq_len))
    tokens = a.batch_size * a.seq_len
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(data)
    loss = out.loss if hasattr(out, "loss") else out
    if isinstance(loss, tuple):
      loss = loss[0]
    loss.backward()
    opt.step()
    return float(loss)

  for _ in range(2):
    step()
  t0 = time.perf_counter()
  for _ in range(a.steps):
    loss = step()
  dt = (time.perf_counter() - t0) / a.steps
  print(json.dumps({"impl": f"x-transformers {a.wrapper}", "torch_threads": torch.get_num_threads(),
                    "batch_size": a.batch_size, "seq_len": a.seq_len,
                    "params": sum(p.numel() for p in model.parameters()),
                    "tokens_per_s": tokens / dt, "step_time_s": dt, "loss": loss}))


if __name__ == "__main__":
  main()
