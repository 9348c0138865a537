"""Every masked-diffusion sampler against an exact reference. The network is a fixed random
table over 3 generated positions and 2 real tokens whose logits depend on the whole canvas, so
the order and the rule of revealing matter; the reference follows each sampler's rule over
every reachable canvas in numpy (dynamic programming over canvases), and the sampler's
outputs over 20000 keys must match it in total variation. A sampler that keeps the least
confident tokens, ignores its temperature, leaves its reveal probability unnormalised or
fills blocks out of order lands far from its reference."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import mdlm

MASK, BOS = tokenizers.MASK, tokenizers.BOS
REAL = (tokenizers.NUM_SPECIAL, tokenizers.NUM_SPECIAL + 1)  # the two real tokens
T = 4                                                         # BOS + 3 generated positions
DRAWS = 20000


def code(tok):
  """0 for MASK (and BOS, fixed at position 0), 1 or 2 for the real tokens."""
  return 1 + REAL.index(tok) if tok in REAL else 0


class TableNet:
  """logits[i, v] = W[i, v] + sum_j A[i, j, code(x_j), v] over the 2 real tokens (-1e9 on the
  others): every position's distribution depends on what is revealed elsewhere."""

  def __init__(self, vocab, seed=0, scale=0.6):
    rng = np.random.default_rng(seed)
    self.w = rng.normal(size=(T, 2)) * scale
    self.a = rng.normal(size=(T, T, 3, 2)) * scale
    self.c = rng.normal(size=(T, 2)) * 4 * scale   # read by TimedTableNet only
    self.vocab = vocab

  def real_logits(self, canvas, time=None):
    """numpy (T, 2) for one canvas (a tuple of ids); `time` for TimedTableNet only."""
    out = self.w.copy()
    for j, tok in enumerate(canvas):
      out += self.a[:, j, code(tok)]
    return out

  def table(self, x, time_B=None):
    codes = jnp.where(x == REAL[0], 1, jnp.where(x == REAL[1], 2, 0))    # (B, T)
    onehot = jax.nn.one_hot(codes, 3)                                     # (B, T, 3)
    real = jnp.asarray(self.w, jnp.float32) + jnp.einsum(
        "bjc,ijcv->biv", onehot, jnp.asarray(self.a, jnp.float32))
    if time_B is not None:
      real = real + time_B[:, None, None] * jnp.asarray(self.c, jnp.float32)
    full = jnp.full(x.shape + (self.vocab,), -1e9, jnp.float32)
    return full.at[..., REAL[0]].set(real[..., 0]).at[..., REAL[1]].set(real[..., 1])

  def __call__(self, x, positions, segment_ids):
    del positions, segment_ids
    return self.table(x)


class TimedTableNet(mdlm.DiffusionNet):
  """The table plus t · C[i, v]: a time-conditioned network (t = 0 when not given, as
  `DiffusionNet.run`), so a sampler that passes the wrong time, or none, draws from other
  distributions."""

  def __init__(self, vocab, seed=0):   # pylint: disable=super-init-not-called
    self.inner = TableNet(vocab, seed)
    self.critic_kind, self.self_condition, self.time_condition = "none", False, True

  def real_logits(self, canvas, time=None):
    return self.inner.real_logits(canvas) + time * self.inner.c

  def run(self, x, positions, segment_ids, cond=None, time_B=None):
    del positions, segment_ids, cond
    time_B = jnp.zeros(x.shape[:1], jnp.float32) if time_B is None else time_B
    return self.inner.table(x, time_B), None


class CriticTableNet(TimedTableNet):
  """TimedTableNet with a critic: the score of a candidate token v at position i is
  S[i, code(v)] (its logit that the token is wrong), so which positions the confidence
  sampler keeps depends on the drawn tokens and on the critic's noise."""

  def __init__(self, vocab, seed=0):
    super().__init__(vocab, seed)
    self.critic_kind = "self"
    self.s = np.random.default_rng(seed + 100).normal(size=(T, 3))

  def critic(self, tokens, positions, segment_ids):
    del positions, segment_ids
    codes = jnp.where(tokens == REAL[0], 1, jnp.where(tokens == REAL[1], 2, 0))
    return jnp.asarray(self.s, jnp.float32)[jnp.arange(T)[None], codes]


def lowest_with_gumbel(scores, scale):
  """{i: P(i has the lowest scores[i] + scale * g_i)}, g_i iid standard Gumbel, by
  quadrature: P(j) = integral of f(x) prod_{i != j} P(g_i > x + (b_j - b_i) / scale) dx."""
  from scipy import integrate
  keys = list(scores)
  if scale == 0:
    best = min(keys, key=lambda i: (scores[i], i))
    return {i: float(i == best) for i in keys}
  out = {}
  for j in keys:
    def f(x, j=j):
      dens = math.exp(-x - math.exp(-x))
      for i in keys:
        if i != j:
          dens *= 1.0 - math.exp(-math.exp(-(x + (scores[j] - scores[i]) / scale)))
      return dens
    out[j] = integrate.quad(f, -10, 40, limit=200)[0]
  return out


def critic_reference(net, steps, temperature, critic_noise):
  """The confidence sampler with critic scores, one position revealed per step (3 masks, 3
  steps): the kept position has the lowest critic score plus Gumbel noise of scale
  critic_noise * frac."""
  def step(k, canvas):
    frac = 1.0 - (k + 1) / steps
    out = []
    for chosen, prob, _ in joint_draws(net, canvas, temperature * frac, 1.0 - k / steps):
      assert len(chosen) - math.floor((T - 1) * frac + 1e-4) == 1   # one kept per step
      scores = {i: net.s[i, 1 + c] for i, c in chosen.items()}
      for i, q in lowest_with_gumbel(scores, critic_noise * frac).items():
        out.append((commit(canvas, {i: chosen[i]}), prob * q))
    return out
  return step


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def tempered(logits, temperature, min_p=0.0):
  """Per position: the draw's distribution over the 2 real tokens (argmax at temperature 0),
  and which tokens min-p keeps (at least min_p times the best, at that temperature)."""
  if temperature == 0:
    p = np.eye(2)[np.argmax(logits, -1)]
    return p, p > 0 if min_p > 0 else np.ones_like(p, bool)
  p = softmax(logits / temperature)
  kept = p >= min_p * p.max(-1, keepdims=True)
  p = np.where(kept, p, 0.0)
  return p / p.sum(-1, keepdims=True), kept


def joint_draws(net, canvas, temperature, time=None, min_p=0.0):
  """[(tokens drawn at every masked position, probability, their log-probabilities at
  temperature 1 renormalised over the kept tokens)] for one canvas."""
  masked = [i for i, tok in enumerate(canvas) if tok == MASK]
  z = net.real_logits(canvas, time)
  p, kept = tempered(z, temperature, min_p)
  with np.errstate(divide="ignore"):
    logp = np.log(softmax(np.where(kept, z, -np.inf)))
  out = []
  for combo in itertools.product(range(2), repeat=len(masked)):
    prob = math.prod(p[i, c] for i, c in zip(masked, combo))
    if prob > 0:
      out.append((dict(zip(masked, combo)), prob, {i: logp[i, c] for i, c in zip(masked, combo)}))
  return out


def commit(canvas, chosen):
  c = list(canvas)
  for i, v in chosen.items():
    c[i] = REAL[v]
  return tuple(c)


def top(conf, count):
  """The `count` most confident positions (ties to the lower index, as a stable sort)."""
  return sorted(conf, key=lambda i: (-conf[i], i))[:count]


def run_reference(start, steps, step_fn):
  dist = {start: 1.0}
  for k in range(steps):
    new = {}
    for canvas, p in dist.items():
      for nxt, q in step_fn(k, canvas):
        new[nxt] = new.get(nxt, 0.0) + p * q
    dist = new
  return dist


def ancestral_reference(net, opts, steps, temperature, grid="uniform", timed=False):
  r = np.arange(steps + 1) / steps
  ts = 1.0 - r if grid == "uniform" else np.cos(0.5 * np.pi * r)

  def step(k, canvas):
    p_t = float(mdlm.mask_prob(opts, ts[k]))
    p_s = float(mdlm.mask_prob(opts, ts[k + 1]))
    r = 1.0 if ts[k + 1] <= 0 else (p_t - p_s) / p_t
    out = []
    masked = [i for i, tok in enumerate(canvas) if tok == MASK]
    for chosen, prob, _ in joint_draws(net, canvas, temperature, ts[k] if timed else None):
      for reveal in itertools.product([False, True], repeat=len(masked)):
        q = prob * math.prod(r if x else 1 - r for x in reveal)
        out.append((commit(canvas, {i: chosen[i] for i, x in zip(masked, reveal) if x}), q))
    return out
  return step


def confidence_reference(net, steps, temperature, n0, timed=False, min_p=0.0):
  def step(k, canvas):
    frac = 1.0 - (k + 1) / steps
    stay = math.floor(n0 * frac + 1e-4)
    out = []
    for chosen, prob, logp in joint_draws(net, canvas, temperature * frac,
                                          1.0 - k / steps if timed else None, min_p):
      reveal = max(len(chosen) - stay, 0)
      out.append((commit(canvas, {i: chosen[i] for i in top(logp, reveal)}), prob))
    return out
  return step


def llada_reference(net, steps, temperature, remasking, timed=False):
  def step(k, canvas):
    masked = [i for i, tok in enumerate(canvas) if tok == MASK]
    if not masked:
      return [(canvas, 1.0)]
    count = -(-len(masked) // max(steps - k, 1))
    out = []
    for chosen, prob, logp in joint_draws(net, canvas, temperature,
                                          1.0 - k / steps if timed else None):
      if remasking == "random":
        subsets = list(itertools.combinations(masked, count))
        out += [(commit(canvas, {i: chosen[i] for i in s}), prob / len(subsets))
                for s in subsets]
      else:
        out.append((commit(canvas, {i: chosen[i] for i in top(logp, count)}), prob))
    return out
  return step


def make_objective(make_config, **opts):
  cfg = make_config({"objective.name": "mdlm", **{f"objective.{k}": v for k, v in opts.items()}})
  return objectives.create(cfg, tokenizers.get_tokenizer("bytes"))


def empirical(obj, net, sampler, steps, calls=None, **options):
  """The frequencies of the sampler's outputs: DRAWS / 2 keys, each decoding a batch of 2
  rows (both rows' outputs pooled). `calls`: the network calls every decode must report."""
  canvas = jnp.asarray([[BOS] + [MASK] * (T - 1)] * 2, jnp.int32)
  fn = jax.jit(jax.vmap(lambda k: obj.sample(net, canvas, k, sampler=sampler, steps=steps,
                                             **options)))
  out, info = fn(jax.random.split(jax.random.key(7), DRAWS // 2))
  out = np.asarray(out).reshape(DRAWS, T)
  assert (out != MASK).all()
  if calls is not None:
    assert (np.asarray(info["calls"]) == calls).all(), np.unique(np.asarray(info["calls"]))
  counts = {}
  for row in map(tuple, out.tolist()):
    counts[row] = counts.get(row, 0) + 1
  return {k: v / DRAWS for k, v in counts.items()}


def total_variation(p, q):
  return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def check(emp, ref, tol=0.025):
  ref = {k: v for k, v in ref.items() if v > 1e-12}
  assert abs(sum(ref.values()) - 1) < 1e-9
  tv = total_variation(emp, ref)
  assert tv < tol, (tv, sorted(emp.items()), sorted(ref.items()))
  return tv


START = (BOS,) + (MASK,) * (T - 1)


def table(obj, seed, timed):
  return TimedTableNet(obj.vocab_size, seed) if timed else TableNet(obj.vocab_size, seed)


@pytest.mark.parametrize("temperature,steps,schedule,grid,timed", [
    (1.0, 4, "linear", "uniform", False), (0.6, 3, "linear", "uniform", False),
    (1.0, 2, "cosine", "uniform", False), (1.0, 3, "linear", "cosine", False),
    (1.0, 3, "linear", "uniform", True)])
@pytest.mark.slow
def test_ancestral_matches_its_exact_reference(make_config, temperature, steps, schedule, grid,
                                               timed):
  obj = make_objective(make_config, schedule=schedule, time_conditioning=timed)
  net = table(obj, 0, timed)
  ref = run_reference(START, steps, ancestral_reference(net, obj.opts, steps, temperature,
                                                        grid, timed))
  check(empirical(obj, net, "ancestral", steps, temperature=temperature, grid=grid), ref)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,steps,min_p,timed", [
    (1.0, 3, 0.0, False), (2.0, 2, 0.0, False), (0.0, 3, 0.0, False), (1.5, 3, 0.5, False),
    (1.0, 3, 0.0, True)])
def test_confidence_matches_its_exact_reference(make_config, temperature, steps, min_p, timed):
  obj = make_objective(make_config, time_conditioning=timed)
  net = table(obj, 1, timed)
  ref = run_reference(START, steps, confidence_reference(net, steps, temperature, T - 1, timed,
                                                         min_p))
  check(empirical(obj, net, "confidence", steps, calls=steps, temperature=temperature,
                  min_p=min_p), ref)


@pytest.mark.parametrize("temperature,steps,remasking,timed", [
    (0.0, 3, "low_confidence", False), (1.0, 2, "low_confidence", False),
    (1.0, 3, "low_confidence", False), (1.0, 2, "random", False),
    (1.0, 1, "low_confidence", False), (1.0, 3, "low_confidence", True)])
@pytest.mark.slow
def test_llada_matches_its_exact_reference(make_config, temperature, steps, remasking, timed):
  obj = make_objective(make_config, time_conditioning=timed)
  net = table(obj, 2, timed)
  ref = run_reference(START, steps, llada_reference(net, steps, temperature, remasking, timed))
  check(empirical(obj, net, "llada", steps, calls=steps, temperature=temperature,
                  remasking=remasking), ref)


@pytest.mark.slow
@pytest.mark.parametrize("critic_noise", [1.0, 3.0])
def test_confidence_with_critic_matches_its_exact_reference(make_config, critic_noise):
  """Critic scores of the drawn tokens plus Gumbel noise annealed with the step choose the
  position kept; the critic runs once per step (two calls)."""
  obj = make_objective(make_config, time_conditioning=True)
  net = CriticTableNet(obj.vocab_size, 3)
  ref = run_reference(START, 3, critic_reference(net, 3, 1.0, critic_noise))
  quiet = run_reference(START, 3, critic_reference(net, 3, 1.0, 0.3 * critic_noise))
  assert total_variation(ref, quiet) > 0.08   # the noise's scale shows
  check(empirical(obj, net, "confidence", 3, calls=6, temperature=1.0, critic=True,
                  critic_noise=critic_noise), ref)


def test_the_references_tell_the_rules_apart(make_config):
  """The tolerance is far below the distance between rules: a least-confident rule, an
  ignored temperature or an unnormalised reveal probability would be caught."""
  obj = make_objective(make_config)
  net = TableNet(obj.vocab_size, seed=1)
  conf = run_reference(START, 3, confidence_reference(net, 3, 1.0, T - 1))
  hot = run_reference(START, 3, confidence_reference(net, 3, 2.0, T - 1))
  anc = run_reference(START, 3, ancestral_reference(net, obj.opts, 3, 1.0))
  assert min(total_variation(conf, hot), total_variation(conf, anc)) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_masks_left_after_each_step_are_binomial(make_config, schedule):
  """P(a position is still masked after the step to s) = prod of (1 - reveal prob) = p(s) /
  p(1): the count left is Binomial(n, p(s) / p(1)) at every step."""
  from scipy import stats
  obj = make_objective(make_config, schedule=schedule)
  n, steps = 16, 4
  canvas = jnp.asarray([[BOS] + [MASK] * n], jnp.int32)
  flat = lambda x, pos, seg: jnp.zeros(x.shape + (obj.vocab_size,), jnp.float32)
  fn = jax.jit(jax.vmap(lambda k: obj.sample(flat, canvas, k, sampler="ancestral", steps=steps,
                                             snapshots=steps)[1]["history"][:, 0]))
  hist = np.asarray(fn(jax.random.split(jax.random.key(3), 8000)))      # (draws, steps, T)
  left = (hist == MASK).sum(-1)
  ts = 1.0 - np.arange(steps + 1) / steps
  p1 = float(mdlm.mask_prob(obj.opts, 1.0))
  for k in range(steps - 1):
    q = float(mdlm.mask_prob(obj.opts, ts[k + 1])) / p1
    want = stats.binom.pmf(np.arange(n + 1), n, q)
    freq = np.bincount(left[:, k], minlength=n + 1) / len(left)
    assert 0.5 * np.abs(freq - want).sum() < 0.04, (k, q, freq.round(3), want.round(3))
  assert (left[:, -1] == 0).all()
