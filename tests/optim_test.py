"""The optimizer's masks and schedule, against hand-computed Adam and cosine values."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from paraformer_jax import optim


def _adam_moments(grads, b1=0.9, b2=0.999):
  m = v = 0.0
  for g in grads:
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
  return m, v


def test_an_lpa_update_leaves_absent_branches_alone_after_earlier_steps():
  """Branches 2 and 3 are absent from update i = 2 (num_present=2; their gradient is zero,
  as the prefix loss gives them): parameters, moments and count stay as they were, while
  moments from an earlier full step would otherwise move them. Branches 0 and 1 and the
  shared parameter take a second Adam step, computed by hand."""
  lr, eps = 1e-3, 1e-8
  tx = optim.make_tx(ml_collections.ConfigDict(dict(learning_rate=lr, schedule='constant',
                                                    optimizer='adam')), steps_per_stage=10)
  params = {'branches': {'w': jnp.arange(4.0)}, 'shared': {'w': jnp.float32(1.0)}}
  state = optim.init(tx, params)
  g_full = {'branches': {'w': jnp.array([0.5, -1.0, 2.0, 0.25])},
            'shared': {'w': jnp.float32(0.3)}}
  p1, state1 = optim.update(tx, g_full, state, params, step=0)
  g_lpa = {'branches': {'w': jnp.array([1.0, 0.5, 0.0, 0.0])}, 'shared': {'w': jnp.float32(-0.2)}}
  p2, state2 = optim.update(tx, g_lpa, state1, p1, num_present=2, step=1)

  got = np.asarray(p2['branches']['w'])
  np.testing.assert_array_equal(got[2:], np.asarray(p1['branches']['w'])[2:])
  leaves = [jax.tree.leaves(s['branches']) for s in (state1, state2)]  # count, mu, nu
  assert len(leaves[0]) == 3
  for old, new in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(new)[2:], np.asarray(old)[2:])
  for i in (0, 1):  # two steps of Adam, bias-corrected at t = 2
    m, v = _adam_moments([float(g_full['branches']['w'][i]), float(g_lpa['branches']['w'][i])])
    want = float(p1['branches']['w'][i]) - lr * (m / (1 - 0.9 ** 2)) / (
        math.sqrt(v / (1 - 0.999 ** 2)) + eps)
    np.testing.assert_allclose(got[i], want, rtol=1e-5)  # float32 against float64
  m, v = _adam_moments([0.3, -0.2])
  np.testing.assert_allclose(float(p2['shared']['w']), float(p1['shared']['w']) - lr * (
      m / (1 - 0.9 ** 2)) / (math.sqrt(v / (1 - 0.999 ** 2)) + eps), rtol=1e-5)  # float32 against float64


def test_the_cosine_schedule_restarts_with_every_stage():
  """Stage s of a stagewise run spans global steps [10 s, 10 s + 10): each stage warms up over
  2 steps and decays to 0 by its own end. A fresh Adam step on a gradient of 1 moves a
  parameter by lr(step) * 1 / (1 + eps), so the move is the schedule's value."""
  lr, warmup, per_stage = 1e-2, 2, 10
  tx = optim.make_tx(ml_collections.ConfigDict(dict(learning_rate=lr, schedule='cosine',
                                                    optimizer='adam')), per_stage, warmup)

  def cosine(t):  # optax.warmup_cosine_decay_schedule(0, lr, warmup, per_stage), by hand
    if t < warmup:
      return lr * t / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (per_stage - warmup)))

  params = {'branches': {'w': jnp.zeros(1)}, 'shared': {'w': jnp.float32(0.0)}}
  grads = {'branches': {'w': jnp.ones(1)}, 'shared': {'w': jnp.float32(1.0)}}
  for stage in (0, 1, 2):
    for t in (0, 1, 2, 5, 9):
      step = stage * per_stage + t
      new, _ = optim.update(tx, grads, optim.init(tx, params), params, step=step)
      np.testing.assert_allclose(-float(new['shared']['w']), cosine(t), rtol=1e-5, atol=1e-12)
      np.testing.assert_allclose(-float(new['branches']['w'][0]), cosine(t), rtol=1e-5,
                                 atol=1e-12)


def _decay_config(optimizer):
  return ml_collections.ConfigDict(dict(learning_rate=1e-3, schedule='cosine',
                                        optimizer=optimizer, weight_decay=0.1))


def test_kernel_decay_is_big_vision_s_and_adamw_is_optax_s():
  """With zero gradients Adam's update is 0, so a step is the decay alone. big_vision's
  (optim 'adam_kernel_decay'): kernel -= shape(step) x wd x kernel, shape = lr(step) / peak,
  biases untouched; optax's adamw: every parameter -= lr(step) x wd x parameter."""
  params = {'branches': {'fc': {'kernel': jnp.full((2, 3), 2.0), 'bias': jnp.ones((2, 3))}},
            'head': {'kernel': jnp.full((3,), 4.0), 'bias': jnp.ones((3,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  steps_per_stage, warmup = 10, 2
  for step in (1, 5):
    lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps_per_stage - warmup))) \
        if step >= warmup else 1e-3 * step / warmup
    for optimizer, kernel_keep, bias_keep in (
        ('adam_kernel_decay', 1 - lr / 1e-3 * 0.1, 1.0), ('adamw', 1 - lr * 0.1, 1 - lr * 0.1)):
      tx = optim.make_tx(_decay_config(optimizer), steps_per_stage, warmup)
      new, _ = optim.update(tx, zeros, optim.init(tx, params), params, step=step)
      np.testing.assert_allclose(new['head']['kernel'], 4.0 * kernel_keep, rtol=1e-6)
      np.testing.assert_allclose(new['branches']['fc']['kernel'], 2.0 * kernel_keep, rtol=1e-6)
      np.testing.assert_allclose(new['head']['bias'], bias_keep, rtol=1e-6)
      np.testing.assert_allclose(new['branches']['fc']['bias'], bias_keep, rtol=1e-6)
