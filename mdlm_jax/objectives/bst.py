"""`bst`: the Belief State Transformer (Hu et al. 2024; docs/objectives.md).

A forward decoder F reads each row left to right; f_i summarises x_0..x_i (x_0 is the
document's BOS, so f_0 is the empty prefix). A backward decoder B reads each document right to
left after a learned "empty suffix" embedding; b_j summarises x_j..x_e (e the document's last
token) and b_{e+1} is the empty suffix. For every pair j - i >= 2 in one document the head
MLP(concat(f_i, b_j)) gives next-token logits for x_{i+1} and previous-token logits for x_{j-1}.

Layout. B runs on the row shifted by one: slot k holds x_{k+1}, and a document's last slot holds
the empty-suffix embedding, so the state at slot k is b_{k+1}, each document gets its own empty
suffix, and pairs become (i, k) with i < k in one segment (targets x_{i+1} and x_k). B never
reads a token before its own target, nor past its document's end.

Cost. The head's first layer on a concatenation is W_f f_i + W_b b_j: it runs once per position
(A = f W_f + bias, C = b W_b) and pairs only add and gather. Pairs are enumerated by gap slots
g = 1..n/2: slot g holds the n pairs (i, i + g) and, folded into the same n lanes, (i + g - n, i)
(gap n - g), so every pair is computed once and (almost) nothing is wasted on the triangle.
A `lax.scan` walks chunks of slots; the loss of a chunk and its exact gradient are computed
together (a fused custom VJP), so the (pairs, 2V) logits of only one chunk exist at a time
and nothing is recomputed in the backward pass (`bst_pairs.py`).

Prompt/answer rows (a `prompt_mask`: SFT pairs, star-graph problems). The prompt is given,
never a target: only pairs whose targets lie in the answer are formed, i.e. i >= o, o the
prompt's last position. Each row's per-position arrays are read from o on into
`answer_window` lanes (0: the row length), so the head's cost follows the answer's length
squared, not the row's.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from mdlm_jax import model as model_lib
from mdlm_jax import objectives
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives.bst_pairs import head_logits
from mdlm_jax.objectives.bst_pairs import PairSpec
from mdlm_jax.objectives.bst_pairs import gap_slots
from mdlm_jax.objectives.bst_pairs import _take
from mdlm_jax.objectives.bst_pairs import pair_loss
from mdlm_jax.objectives.bst_pairs import answer_window


class BeliefStateNet(nnx.Module):
  """F, B (or F shared), the empty-suffix embedding, the text head (2d -> d -> 2V) and an
  optional distance head (2d -> d -> classes). First layers are stored split: w_f, w_b."""

  def __init__(self, cfg: model_lib.ModelConfig, shared: bool, distance_classes: int,
               rngs: nnx.Rngs):
    d, v = cfg.d_model, cfg.vocab_size
    self.forward_net = model_lib.Transformer(cfg, rngs)
    self.backward_net = None if shared else model_lib.Transformer(cfg, rngs)
    self.suffix = model_lib.param(rngs, (d,), ("embed",), cfg.init_std)
    self.text = _Head(d, 2 * v, cfg.init_std, rngs)
    self.distance = _Head(d, distance_classes, cfg.init_std, rngs) if distance_classes else None

  @property
  def backward(self) -> model_lib.Transformer:
    return self.forward_net if self.backward_net is None else self.backward_net

  def forward_states(self, x_BxT, positions, segment_ids):
    net = self.forward_net
    return net.hidden(net.embed_tokens(x_BxT), positions, segment_ids, causal=True)

  def states(self, x_BxT, positions, segment_ids):
    """(forward states f, backward states); with shared weights both run as one batch."""
    fwd, bwd = self.forward_net, self.backward
    b_in = self.backward_inputs(bwd.embed_tokens(x_BxT), segment_ids)
    if self.backward_net is not None:
      return (self.forward_states(x_BxT, positions, segment_ids),
              jnp.flip(bwd.hidden(*b_in, causal=True), 1))
    f_in = (fwd.embed_tokens(x_BxT), positions, segment_ids)
    h = fwd.hidden(*(jnp.concatenate(p, axis=0) for p in zip(f_in, b_in)), causal=True)
    b = x_BxT.shape[0]
    return h[:b], jnp.flip(h[b:], 1)

  def backward_inputs(self, emb_BxTxD, segment_ids):
    """B's flipped input (embeddings, positions, segment ids): slot k holds x_{k+1}, or the
    empty-suffix embedding at a document's last slot. B's state at slot k is then b_{k+1}:
    x_{k+1}..x_e and the empty suffix, read from the document's end (the row is flipped, so
    B is an ordinary causal decoder)."""
    b, t, _ = emb_BxTxD.shape
    same = (jnp.roll(segment_ids, -1, axis=1) == segment_ids) & (jnp.arange(t) < t - 1)
    e = jnp.where(same[..., None], jnp.roll(emb_BxTxD, -1, axis=1),
                  self.suffix[...].astype(emb_BxTxD.dtype))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return jnp.flip(e, 1), pos, jnp.flip(segment_ids, 1)

  def suffix_state(self, suffix_BxS):
    """b at the start of the given suffix (S may be 0: the empty suffix), (B, D)."""
    net, b = self.backward, suffix_BxS.shape[0]
    e = jnp.broadcast_to(self.suffix[...].astype(net.cfg.compute_dtype), (b, 1, net.cfg.d_model))
    x = jnp.concatenate([e, net.embed_tokens(jnp.flip(suffix_BxS, 1))], axis=1)
    t = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return net.hidden(x, pos, jnp.ones((b, t), jnp.int32), causal=True)


class _Head(nnx.Module):
  def __init__(self, d: int, out: int, std: float, rngs: nnx.Rngs):
    self.w_f = model_lib.param(rngs, (d, d), ("embed", "mlp"), std)
    self.w_b = model_lib.param(rngs, (d, d), ("embed", "mlp"), std)
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("mlp",))
    self.w_out = model_lib.param(rngs, (d, out), ("mlp", "vocab"), std)
    self.b_out = nnx.Param(jnp.zeros((out,), jnp.float32), axes=("vocab",))

  def first_f(self, f_BxTxD):
    """Per-position first-layer terms: the pair (i, k) pre-activation is A_i + C_k."""
    return model_lib.dense(f_BxTxD, self.w_f[...]) + self.bias[...].astype(f_BxTxD.dtype)

  def first_b(self, b_BxTxD):
    return model_lib.dense(b_BxTxD, self.w_b[...])

  def split(self, f_BxTxD, b_BxTxD):
    return self.first_f(f_BxTxD), self.first_b(b_BxTxD)

  def weights(self):
    return self.w_out[...], self.b_out[...]


def segment_last(segment_ids_BxT):
  """Index of the last position of each position's segment."""
  t = segment_ids_BxT.shape[1]
  idx = jnp.arange(t)
  last = (jnp.roll(segment_ids_BxT, -1, axis=1) != segment_ids_BxT) | (idx == t - 1)
  return jax.lax.cummin(jnp.where(last, idx, t), axis=1, reverse=True)


# ------------------------------------------------------------------------------------------


@objectives.register
class BST(base.Objective):
  name = "bst"
  defaults = dict(shared_decoders=False, backward_weight=1.0, pair_fraction=1.0, max_gap=0,
                  distance_weight=0.0, distance_classes=64, pairs_per_chunk=128,
                  answer_window=0)
  causal = True
  accepts_suffix = True

  @classmethod
  def validate(cls, opts):
    checks = (
        (0.0 < opts.pair_fraction <= 1.0,
         f"objective.pair_fraction={opts.pair_fraction} must be in (0, 1] (1 trains on all "
         "pairs)."),
        (opts.max_gap == 0 or opts.max_gap >= 2,
         f"objective.max_gap={opts.max_gap} must be 0 (no limit) or >= 2 (pairs have "
         "j - i >= 2)."),
        (opts.backward_weight >= 0,
         f"objective.backward_weight={opts.backward_weight} must be >= 0."),
        (opts.distance_weight >= 0,
         f"objective.distance_weight={opts.distance_weight} must be >= 0 (0: no distance head)."),
        (opts.distance_classes >= 2,
         f"objective.distance_classes={opts.distance_classes} must be >= 2."),
        (opts.pairs_per_chunk >= 1,
         f"objective.pairs_per_chunk={opts.pairs_per_chunk} must be >= 1."),
        (opts.answer_window == 0 or opts.answer_window >= 2,
         f"objective.answer_window={opts.answer_window} must be 0 (the whole row) or >= 2 "
         "(the answer's length with its EOS, plus 1)."),
    )
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)

  def build(self, rngs):
    o = self.opts
    return BeliefStateNet(self.model_config, o.shared_decoders,
                          o.distance_classes if o.distance_weight > 0 else 0, rngs)

  # --- training ---
  def spec(self, n: int) -> PairSpec:
    o, v = self.opts, self.vocab_size
    groups = (((v, "next", 1.0), (v, "prev", float(o.backward_weight))),)
    if o.distance_weight > 0:
      groups += (((o.distance_classes, "gap", float(o.distance_weight)),),)
    max_k_gap = (o.max_gap - 1) if o.max_gap else n - 1
    return PairSpec(groups, min(max_k_gap, n - 1), max(1, o.pairs_per_chunk // n))

  def slots(self, rng, batch: int, n: int, fraction: float = 1.0):
    """Each row's gap slots: all, or a random `fraction` of them (every pair then has the
    same chance to be trained on)."""
    num = gap_slots(n, self.spec(n).max_k_gap)
    all_slots = jnp.broadcast_to(jnp.arange(1, num + 1, dtype=jnp.int32), (batch, num))
    if fraction >= 1.0:
      return all_slots
    keep = max(1, round(fraction * num))
    order = jnp.argsort(jax.random.uniform(rng, (batch, num)), axis=1)
    return jnp.take_along_axis(all_slots, order[:, :keep], axis=1)

  def pair_inputs(self, net: BeliefStateNet, batch):
    x, seg = batch["inputs"], batch["segment_ids"]
    f, bst = net.states(x, batch["positions"], seg)
    heads = [net.text.split(f, bst) + net.text.weights()]
    if net.distance is not None:
      heads.append(net.distance.split(f, bst) + net.distance.weights())
    data = (jnp.roll(x, -1, axis=1), x, seg)
    return heads, data

  def pair_sums(self, heads, data, batch, rng, fraction: float = 1.0):
    """pair_loss over every pair of each row (`answer_window` lanes from the prompt's end
    with prompt/answer rows); returns (weighted sum, sums, rows cut by the window)."""
    cut = jnp.zeros((), jnp.int32)
    if "prompt_mask" in batch:
      heads, data, cut = answer_window(heads, data, batch["prompt_mask"],
                                       self.opts.answer_window)
    b, n = data[2].shape
    total, sums = pair_loss(self.spec(n), heads, data, self.slots(rng, b, n, fraction))
    return total, sums, cut

  def loss_sums(self, model, batch, rng):
    b = batch["inputs"].shape[0]
    heads, data = self.pair_inputs(model, batch)
    total, sums, cut = self.pair_sums(heads, data, batch, rng, self.opts.pair_fraction)
    count = jax.lax.stop_gradient(sums[-1])
    metrics = {"ce_forward": (sums[0], count), "ce_backward": (sums[1], count),
               "pairs_per_row": (count, float(b))}
    if "prompt_mask" in batch:
      metrics["rows_cut"] = (cut, float(b))
    if len(sums) > 3:
      metrics["ce_distance"] = (sums[2], count)
    return total, count, metrics

  def eval_sums(self, model, batch, rng):
    """The forward likelihood with the empty suffix (a left-to-right factorisation, so its
    bits/byte compare with `ar`'s), plus the all-pairs cross-entropies."""
    x, seg = batch["inputs"], batch["segment_ids"]
    n = x.shape[1]
    heads, data = self.pair_inputs(model, batch)
    a, c, w, bias = heads[0]
    last = segment_last(seg)
    v = self.vocab_size
    logits = head_logits(a, _take(c, last), w[:, :v], bias[:v])
    targets = jnp.roll(x, -1, axis=1)
    valid = ((seg > 0) & (last > jnp.arange(n)) & base.next_is_answer(batch)).astype(jnp.float32)
    nll = base.cross_entropy(logits, targets)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    _, sums, _ = self.pair_sums(heads, data, batch, rng)
    return {"nll": jnp.sum(nll * valid), "tokens": jnp.sum(valid),
            "bytes": jnp.sum(token_bytes[targets] * valid),
            "pair_ce_forward": sums[0], "pair_ce_backward": sums[1], "pairs": sums[-1]}

  def flops_per_token(self, seq_len: int) -> float:
    """Two decoders, plus the head: its first layer per position (2 d^2 x 2), its output
    layer on every pair (about seq_len / 2 pairs per token, or W (W - 1) / 2 per row with an
    `answer_window` W), forward and backward."""
    cfg = self.model_config
    d, v = cfg.d_model, cfg.vocab_size
    decoders = 2 * base.forward_flops_per_token(cfg, seq_len) - 2 * 2 * d * v  # no unembed
    out = 2 * v + (self.opts.distance_classes if self.opts.distance_weight > 0 else 0)
    per_pos = 2 * 2 * d * d
    per_pair = 2 * d * out + 2 * d  # output layer + the pair sum
    w = self.opts.answer_window
    pairs_per_token = ((w * (w - 1) / 2 / seq_len) if w else (seq_len - 1) / 2) * \
        self.opts.pair_fraction
    return 3.0 * (decoders + per_pos + pairs_per_token * per_pair)

  # --- generation ---
  def generate(self, model, prompt_BxP, rng, *, max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, suffix_BxS=None, num_candidates=1, end="fixed"):
    """Samples middles between each prompt row and `suffix_BxS` (None or width 0: the empty
    suffix, i.e. unconditional continuation) with F's KV cache and the suffix encoded once.
    A middle stops at its EOS. Trained middles hold no EOS before a non-empty suffix, so there
    `end` says where a middle ends: 'fixed' keeps `max_new_tokens` tokens (a span of known
    length); 'best' cuts each middle at the length L (0..its own) where the completed text
    m[:L] + suffix is most likely given the prefix under the left-to-right factorisation (F
    with the empty suffix, the likelihood `eval_sums` reports); the rest becomes PAD.
    With num_candidates K > 1, K middles are drawn per row and one is kept: with the empty
    suffix the one the backward head finds most likely (`middle_log_likelihood`, the paper's
    goal-conditioned planning); with a suffix and end='best', the one whose completed text is
    most likely (a criterion comparable across lengths); with end='fixed', the backward head's
    choice. Returns (B, P + max_new_tokens) int32."""
    if end not in ("fixed", "best"):
      raise ValueError(f"end={end!r} must be 'fixed' or 'best'.")
    b, p = prompt_BxP.shape
    if suffix_BxS is None:
      suffix_BxS = jnp.zeros((b, 0), jnp.int32)
    k = num_candidates
    prompts = jnp.repeat(prompt_BxP, k, axis=0)
    suffixes = jnp.repeat(suffix_BxS, k, axis=0)
    suffix_states = model.suffix_state(suffixes)
    out = sampling.generate_ar(_ForwardHead(model, suffix_states[:, -1]), prompts, rng,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, min_p=min_p)
    cut = end == "best" and suffix_BxS.shape[1] > 0
    if cut:
      middles, score = self.best_cut(model, prompts, out[:, p:], suffixes)
      out = jnp.concatenate([prompts, middles], axis=1)
    if k == 1:
      return out
    if not cut:
      score = self.middle_log_likelihood(model, prompts, out[:, p:], suffixes)
    best = jnp.argmax(score.reshape(b, k), axis=1)
    return out.reshape(b, k, -1)[jnp.arange(b), best]

  def canvas_width(self, prompt_len: int, suffix_len: int, max_new_tokens: int) -> int:
    # B reads the suffix after its empty-suffix slot; end='best' reads prefix + middle + suffix
    return max(prompt_len + max_new_tokens + suffix_len, suffix_len + 1)

  def completed_log_likelihood(self, model, prompt_BxP, middle_BxL, suffix_BxS, lengths_B):
    """log p(m[:L] + suffix | prefix) under F with the empty suffix, L = lengths_B per row."""
    b, p = prompt_BxP.shape
    l, s = middle_BxL.shape[1], suffix_BxS.shape[1]
    idx = jnp.arange(l + s)[None, :]
    # the suffix moved up to follow m[:L]; PAD after it
    src = jnp.where(idx < lengths_B[:, None], idx, idx - lengths_B[:, None] + l)
    tail = jnp.take_along_axis(jnp.concatenate([middle_BxL, suffix_BxS], axis=1),
                               jnp.clip(src, 0, l + s - 1), axis=1)
    real = idx < (lengths_B[:, None] + s)
    x = jnp.concatenate([prompt_BxP, jnp.where(real, tail, tokenizers.PAD)], axis=1)
    seg = jnp.concatenate([jnp.ones_like(prompt_BxP), real.astype(jnp.int32)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(p + l + s, dtype=jnp.int32), x.shape)
    f = model.forward_states(x, pos, seg)[:, p - 1:-1]      # predicts x[p], x[p + 1], ...
    empty = model.suffix_state(jnp.zeros((b, 0), jnp.int32))[:, -1:]
    w, bias = model.text.weights()
    v = self.vocab_size
    logits = head_logits(model.text.first_f(f), model.text.first_b(empty), w[:, :v], bias[:v])
    return -jnp.sum(jnp.where(real, base.cross_entropy(logits, x[:, p:]), 0.0), axis=1)

  def best_cut(self, model, prompt_BxP, middle_BxL, suffix_BxS):
    """(middles cut at their most likely end, PAD after it; the completed texts' scores)."""
    l = middle_BxL.shape[1]
    own = _until_eos(middle_BxL) & (middle_BxL != tokenizers.PAD)
    n_own = jnp.sum(own, axis=1)
    middle = jnp.where(own, middle_BxL, tokenizers.PAD)
    scores = jax.lax.map(lambda n: self.completed_log_likelihood(
        model, prompt_BxP, middle, suffix_BxS, jnp.full(n_own.shape, n)), jnp.arange(l + 1))
    scores = jnp.where(jnp.arange(l + 1)[:, None] <= n_own[None, :], scores, -jnp.inf)
    length = jnp.argmax(scores, axis=0)
    keep = jnp.arange(l)[None, :] < length[:, None]
    return jnp.where(keep, middle, tokenizers.PAD), jnp.max(scores, axis=0)

  def middle_log_likelihood(self, model, prompt_BxP, middle_BxL, suffix_BxS):
    """log p(middle | prefix, suffix) under the backward head, right to left: the middle's
    token m_t is scored from (f at the prefix end, b after m_{t+1}..m_L and the suffix).
    A middle is its tokens up to and including its first EOS (or PAD, read as EOS): what
    follows is neither read nor scored, the middle being moved right so that its last token
    meets the suffix."""
    own = _until_eos(middle_BxL)
    n = jnp.sum(own, axis=1)
    l = middle_BxL.shape[1]
    middle = jnp.where(middle_BxL == tokenizers.PAD, tokenizers.EOS, middle_BxL)
    shift = l - n
    src = jnp.arange(l)[None, :] - shift[:, None]           # right-aligned: PAD first
    scored = src >= 0
    middle = jnp.where(scored, jnp.take_along_axis(middle, jnp.maximum(src, 0), axis=1),
                       tokenizers.PAD)
    f = model.forward_states(prompt_BxP, jnp.broadcast_to(
        jnp.arange(prompt_BxP.shape[1], dtype=jnp.int32), prompt_BxP.shape),
        jnp.ones_like(prompt_BxP))[:, -1:]
    states = model.suffix_state(jnp.concatenate([middle, suffix_BxS], axis=1))
    s = suffix_BxS.shape[1]
    states = states[:, s:s + l]            # after the suffix, after m_L, ..., after m_2
    a, c = model.text.split(f, states)
    w, bias = model.text.weights()
    v = self.vocab_size
    logits = head_logits(a, c, w[:, v:], bias[v:])
    targets = jnp.flip(middle, 1)          # m_L, ..., m_1
    ce = base.cross_entropy(logits, targets)
    return -jnp.sum(jnp.where(jnp.flip(scored, 1), ce, 0.0), axis=1)


def _until_eos(middle_BxL):
  """(B, L) bool: the middle's own tokens, up to and including its first EOS or PAD."""
  stop = (middle_BxL == tokenizers.EOS) | (middle_BxL == tokenizers.PAD)
  return jnp.cumsum(stop, axis=1) - stop < 1


class _ForwardHead:
  """Duck-types the Transformer's decoding API for `sampling.generate_ar`: logits are the
  text head's next-token half on (F's state, the fixed suffix state)."""

  def __init__(self, net: BeliefStateNet, suffix_state_BxD):
    self.net = net
    self.c = net.text.first_b(suffix_state_BxD[:, None])

  def init_cache(self, batch, length):
    return self.net.forward_net.init_cache(batch, length)

  def decode(self, tokens_BxT, cache):
    h, cache = self.net.forward_net.decode_hidden(tokens_BxT, cache)
    a = self.net.text.first_f(h)
    w, bias = self.net.text.weights()
    v = w.shape[1] // 2
    return head_logits(a, self.c, w[:, :v], bias[:v]), cache

