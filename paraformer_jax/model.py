"""The ParaFormer model: a shared patch embedding, L parallel branches of M blocks, one head.

Flax Linen (not NNX) because its parameters are plain pytrees: taking the first k branches,
freezing some and appending new ones are array operations on the leading branch axis of
`params['branches']`, with no split/merge round trip.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HEAD_DIM = 64  # the papers' (and vit-pytorch's) head width
BLOCK_STYLES = ('prenorm', 'reference')
POOLS = ('cls', 'mean')
POSEMBS = ('learned', 'sincos2d')


def posemb_sincos_2d(rows: int, cols: int, width: int, temperature: float = 10_000.):
  """big_vision's fixed position embedding (MoCo v3's): sin and cos of each patch's column
  and row at width / 4 frequencies, [1, rows x cols, width] in row-major patch order."""
  if width % 4:
    raise ValueError(f"model.posemb='sincos2d' needs a width divisible by 4, not {width}.")
  y, x = np.mgrid[:rows, :cols]
  omega = 1. / temperature ** (np.arange(width // 4) / (width // 4 - 1))
  y, x = np.outer(y.ravel(), omega), np.outer(x.ravel(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], 1)[None].astype(np.float32)
BRANCH_STRATEGIES = ('auto', 'vmap', 'scan', 'unrolled', 'fused')
INITS = ('auto', 'torch', 'jax')
# LayerNorm epsilon per block style: Flax's default, and torch's (the authors' model).
LN_EPSILON = {'prenorm': 1e-6, 'reference': 1e-5}


def torch_kernel_init(key, shape, dtype=jnp.float32):
  """torch.nn.Linear's default weight init, U(+-1/sqrt(fan_in)), fan_in = shape[0] (the
  kernel's input axis; Flax's DenseGeneral flattens to (in, out) before initializing)."""
  bound = 1 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init, U(+-1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def on_cpu(platform: str | None) -> bool:
  """Whether a program for devices of `platform` (None: JAX's default backend) runs on XLA:CPU.

  The compile target need not be this host's backend (`aot` compiles for TPU slices here),
  so every CPU-only choice below asks this of the mesh's platform, never of the host.
  """
  return (platform or jax.default_backend()) == 'cpu'


def flat(x, platform: str | None):
  """[..., D] -> [rows, D] on a CPU, the input of every dense layer in a block; x elsewhere.

  The weight gradient of a dense layer applied to [batch, tokens, D] contracts two axes,
  which XLA:CPU lays out by first copying the activations or the output gradient into
  transposed order: in the 8x2 training step's profile those copies took about a tenth of
  the op time. Contracting one axis, the matmul reads its operand transposed in place: the
  step ran 1.10-1.11x faster (docs/benchmarks.md). On a TPU the same reshapes cross tiled
  layouts (197 tokens are no multiple of 8): with dropout the imagenet step's temporaries on
  v5e grew 6x (7.0 against 1.2 GiB per chip at batch 64 on v5e:2x2), so other targets keep
  [batch, tokens, D].
  """
  return x.reshape(-1, x.shape[-1]) if on_cpu(platform) else x


def dense(features, torch_init: bool, fan_in: int, **kwargs):
  """nn.Dense (or nn.DenseGeneral with `axis`), initialized as torch's nn.Linear if asked."""
  if torch_init:
    kwargs.update(kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in))
  return (nn.DenseGeneral if 'axis' in kwargs else nn.Dense)(features, **kwargs)


class Attention(nn.Module):
  """Multi-head self-attention; qkv without bias, as in the authors' code.

  The qkv kernel is one [D, 3, heads, head_dim] parameter with nn.DenseGeneral's name, layout
  and initial values, applied by `project_qkv`.
  """
  num_heads: int
  dropout: float
  dtype: Any
  platform: str | None = None  # of the devices it runs on; None: JAX's default backend
  torch_init: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool, num_queries=None, qkv=None, noise=None):
    """`num_queries`: only the first tokens ask (keys and values still come from all).
    `qkv`: (q, k, v), each [batch, heads, tokens, head_dim], computed by the caller (the
    fused branch stack), skipping ours. `noise`: see `Dropout`."""
    if qkv is None:
      kernel = QkvKernel((x.shape[-1], 3, self.num_heads, HEAD_DIM), self.torch_init,
                         name='qkv')()
      qkv = project_qkv(x.astype(self.dtype), kernel.astype(self.dtype), num_queries,
                        self.platform)
    q, k, v = qkv
    y = _attention(q[:, :, :num_queries], k, v, self.platform)
    b, _, t, _ = y.shape  # [batch, heads, tokens, head_dim]; rows on a CPU, as in `flat`:
    y = y.transpose(0, 2, 1, 3)
    if on_cpu(self.platform):
      y = y.reshape(b * t, self.num_heads, HEAD_DIM)
    y = dense(x.shape[-1], self.torch_init, self.num_heads * HEAD_DIM, axis=(-2, -1),
              dtype=self.dtype, name='out')(y)
    return Dropout(self.dropout, self.platform)(y.reshape(b, t, -1), deterministic, noise)


# Measured on a 2-core CPU, 8x2 model, 65 tokens (docs/benchmarks.md): the split
# made batch-1 inference 7% slower, batch 4 the same, batch 16 5% and the batch-64 training
# step 5-8% faster.
SPLIT_QUERY_ROWS = 256


def project_qkv(x, kernel, num_queries=None, platform=None):
  """(q, k, v), each [batch, heads, tokens, head_dim], from x [batch, tokens, D] and the
  [D, 3, heads, head_dim] kernel: one matmul on `flat(x)`. With `num_queries`, from
  `SPLIT_QUERY_ROWS` rows of x up, q only for the first tokens: two matmuls, q's on those
  tokens' rows alone (smaller, one more op's overhead)."""
  def project(x, kernel):
    if not on_cpu(platform):
      return tuple(jnp.einsum('btd,dnh->bnth', x, kernel[:, i]) for i in range(kernel.shape[1]))
    y = flat(x, platform) @ kernel.reshape(kernel.shape[0], -1)
    y = y.reshape(*x.shape[:-1], *kernel.shape[1:])
    return tuple(y[:, :, i].transpose(0, 2, 1, 3) for i in range(kernel.shape[1]))
  if num_queries is None or x.shape[0] * x.shape[1] < SPLIT_QUERY_ROWS:
    return project(x, kernel)
  return project(x[:, :num_queries], kernel[:, :1]) + project(x, kernel[:, 1:])


def _dense_general_init(key, shape, dtype=jnp.float32):
  """nn.DenseGeneral's default kernel init: LeCun normal over the flattened (in, out) shape."""
  flat = (shape[0], math.prod(shape[1:]))
  return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


class QkvKernel(nn.Module):
  """The attention's qkv kernel alone, named and initialised as nn.DenseGeneral's (or as
  torch's bias-free nn.Linear(D, 3 x inner))."""
  shape: tuple
  torch_init: bool = False

  @nn.compact
  def __call__(self):
    return self.param('kernel', torch_kernel_init if self.torch_init else _dense_general_init,
                      self.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_keeping_output(scores, dtype):
  """softmax(scores) over the last axis, computed in float32 and returned in `dtype`, whose
  backward pass reads only that output. jax.nn.softmax's reads its float32 output, so in a
  bfloat16 model autodiff kept each attention's weights twice (float32 for the softmax,
  bfloat16 for the product with v): the imagenet step on v5e:4x4 needed 3.25 GiB of
  temporaries per chip, 2.81 with this (docs/model.md). In float32 the two are the same."""
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_fwd(scores, dtype):
  weights = softmax_keeping_output(scores, dtype)
  return weights, weights


def _softmax_bwd(dtype, weights, g):
  w, g = weights.astype(jnp.float32), g.astype(jnp.float32)
  return (w * (g - (g * w).sum(axis=-1, keepdims=True)),)


softmax_keeping_output.defvjp(_softmax_fwd, _softmax_bwd)


def _attention(q, k, v, platform=None):
  """Softmax attention on [batch, heads, tokens, head_dim] inputs, for devices of `platform`
  (the target of the compile, which need not be this host's backend).

  Off the CPU: scores in float32 from the matmul (as jax.nn.dot_product_attention's XLA
  path, which is also what it runs on a GPU unless asked for cuDNN), and a softmax that keeps
  one copy of its output for the backward pass. On a CPU: q scaled first and the matmul in
  the input's dtype, which ran a block's attention in 2.6 ms against 5.5 ms through
  jax.nn.dot_product_attention (docs/model.md, "Choices made per platform"). The named
  scopes show in the compiled program which path was taken.
  """
  if not on_cpu(platform):
    with jax.named_scope('attention_accelerator'):
      scores = jnp.einsum('bnqh,bnkh->bnqk', q, k, preferred_element_type=jnp.float32)
      weights = softmax_keeping_output(scores * (q.shape[-1] ** -0.5), v.dtype)
      return jnp.einsum('bnqk,bnkh->bnqh', weights, v)
  with jax.named_scope('attention_einsum'):
    scores = jnp.einsum('bnqh,bnkh->bnqk', q * (q.shape[-1] ** -0.5), k)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum('bnqk,bnkh->bnqh', weights, v)


class Dropout(nn.Module):
  """Dropout whose masks do not depend on how the batch and the branches are laid out over
  devices, nor on the branch strategy: an example's mask comes from one key for the whole
  model folded with this layer's name, the example's row in the *global* batch and, inside a
  branch, the branch's index in the *whole* stack. So a training step on a 1x8, 2x4 or 8x1
  mesh, or on one device, draws the same masks.

  `noise` = (key, rows [batch] int32, branch: scalar int32 or None), from `ParaFormer`; None
  (a block used on its own): the 'dropout' key, rows 0..batch-1, no branch. The key is
  passed in rather than drawn here because Flax's lifted scan and vmap derive different keys
  for the same layer.

  The mask is drawn in the form that suits the target (`platform`): the same bits either way
  (`keep_mask`).
  """
  rate: float
  platform: str | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool, noise=None):
    if deterministic or self.rate == 0:
      return x
    if noise is None:
      noise = (self.make_rng('dropout'), jnp.arange(x.shape[0]), None)
    key, rows, branch = noise
    # The layer's name, not Flax's call counter: the same in every branch strategy.
    layer = zlib.crc32('/'.join(self.scope.path).encode())
    keep, keep_prob = keep_mask(key, rows, self.rate, x.shape[1:], layer, branch,
                                elementwise=not on_cpu(self.platform))
    return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)


DROPOUT_LEVELS = 2 ** 16  # dropout rates are quantized to 1/65536


def _mix32(x):
  """A bijective 32-bit integer hash (Wellons' "lowbias32": each output bit flips with
  probability within 0.17% of 1/2 when one input bit does)."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(key, rows, rate: float, shape, layer: int = 0, branch=None,
              elementwise: bool = False):
  """(mask [rows, *shape], keep probability): row r's mask from the key, `layer` (a 32-bit
  constant) and `branch` (None, or a scalar index, possibly traced).

  The key (threefry's, one per step and LPA update) gives two 32-bit words; each becomes
  one word of row r's seed by a chain of mixes: mix(mix(mix(word ^ layer) ^ branch) ^ r).
  Every link is a bijection, so distinct rows of one layer and branch never share a seed.
  The seed (s0, s1) drives a counter-based hash: word i of the row is mix(mix(i ^ s0) ^ s1),
  and each word gives two 16-bit draws, compared with round(rate x 65536).
  Threefry for every word (20 rounds per pair of words) made dropout 11% of the paper's 8x2
  training step on a CPU; the two rounds of mixing cost a fraction of that (docs/
  benchmarks.md). Threefry per row and layer (its fold_in) ran fast, but JAX lowers it on a
  CPU to a loop: 3 per dropout layer were 507 loops in the 8x2 LPA pass step and about a
  third of its compile time. The rate is quantized to 1/65536 (0.1 -> 0.100006); dividing
  by the exact keep probability keeps the expectation unchanged.
  """
  threshold = round(rate * DROPOUT_LEVELS)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = key.reshape(-1)[:2].astype(jnp.uint32)
  branch = jnp.uint32(0) if branch is None else jnp.asarray(branch).astype(jnp.uint32)
  rows = jnp.asarray(rows).astype(jnp.uint32)
  s0, s1 = _mix32(_mix32(_mix32(words ^ jnp.uint32(layer)) ^ branch)[:, None, None]
                  ^ rows[:, None])  # each [rows, 1]
  if elementwise:
    # The same draws, each element from its own index: element j is half j % 2 of word j // 2
    # (little-endian, as the bitcast below). No op but elementwise ones on [rows, *shape],
    # which a TPU fuses into the mask's consumer; the bitcast and reshapes between [rows,
    # n / 2, 2] and [rows, *shape] cross tiled layouts there, and the words are materialized.
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    full = (len(rows), *shape)
    j = sum(jax.lax.broadcasted_iota(jnp.uint32, full, i + 1) * jnp.uint32(stride)
            for i, stride in enumerate(strides))
    s0, s1 = (s.reshape(len(rows), *[1] * len(shape)) for s in (s0, s1))
    word = _mix32(_mix32((j >> 1) ^ s0) ^ s1)
    keep = jnp.where((j & 1) == 1, word >> 16, word & jnp.uint32(0xFFFF)) >= threshold
    return keep, 1.0 - threshold / DROPOUT_LEVELS
  n = math.prod(shape)
  counter = jnp.arange(-(-n // 2), dtype=jnp.uint32)
  draws = jax.lax.bitcast_convert_type(_mix32(_mix32(counter ^ s0) ^ s1), jnp.uint16)
  keep = draws.reshape(len(rows), -1)[:, :n].reshape(len(rows), *shape) >= threshold
  return keep, 1.0 - threshold / DROPOUT_LEVELS


def gelu(x):
  """Exact (erf) GELU, as the authors' nn.GELU().

  jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates piecewise with
  exponentials: about twice the time of this erf form in a training step's profile
  (docs/benchmarks.md), and within 2e-6 of the exact value for |x| <= 10 (tested).
  """
  return 0.5 * x * (1 + jax.lax.erf(x * 2 ** -0.5))


class Mlp(nn.Module):
  mlp_dim: int
  dropout: float
  dtype: Any
  torch_init: bool = False
  platform: str | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool, hidden_only: bool = False, noise=None):
    """`hidden_only`: stop before fc2 (the fused branch stack applies it to all branches)."""
    shape, p = x.shape, self.platform
    y = dense(self.mlp_dim, self.torch_init, shape[-1], dtype=self.dtype, name='fc1')(flat(x, p))
    y = Dropout(self.dropout, p)(gelu(y).reshape(*shape[:-1], -1), deterministic, noise)
    if hidden_only:
      return y
    y = dense(shape[-1], self.torch_init, self.mlp_dim, dtype=self.dtype, name='fc2')(flat(y, p))
    return Dropout(self.dropout, p)(y.reshape(shape), deterministic, noise)


class Block(nn.Module):
  """Attention then MLP, each behind a LayerNorm.

  `prenorm`: y = x + f(LN(x)), the usual pre-norm residual.
  `reference`: y = f(LN(x)) + LN(x), the residual of the authors' published code, kept so
  that results and weights can be compared with it.

  `cls_only` returns only the cls token's output, [batch, 1, D]: every token's keys and values
  are still read, but one query and one MLP row are computed. Exact for a branch's last block
  under cls pooling, where the other tokens' outputs are never used.
  `first` = (LN(x) or None, qkv): the norm1 output and qkv projections, when the fused branch
  stack has computed them for all branches at once (LN(x) is only needed by `reference`).
  `defer_fc2` returns (residual, MLP hidden activations) instead of their sum through fc2,
  for the fused stack to apply every branch's fc2 at once.
  """
  num_heads: int
  mlp_dim: int
  dropout: float
  style: str
  dtype: Any
  platform: str | None = None
  torch_init: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool, cls_only: bool = False, first=None,
               defer_fc2: bool = False, noise=None):
    h, qkv = (None, None) if first is None else first
    if h is None and (qkv is None or self.style == 'reference'):
      h = nn.LayerNorm(LN_EPSILON[self.style], dtype=self.dtype, name='norm1')(x)
    queries = 1 if cls_only else None
    # Given qkv, attention reads only the width of its input.
    y = Attention(self.num_heads, self.dropout, self.dtype, self.platform, self.torch_init,
                  name='attn')(
        x if h is None else h, deterministic, queries, qkv, noise)
    if cls_only:
      x, h = x[:, :1], (None if h is None else h[:, :1])
    x = y + (h if self.style == 'reference' else x)
    h = nn.LayerNorm(LN_EPSILON[self.style], dtype=self.dtype, name='norm2')(x)
    residual = h if self.style == 'reference' else x
    # Off the CPU with dropout, the MLP keeps only its matmuls' outputs for the backward pass
    # and recomputes the rest (GELU, the masks) there: with cls pooling and dropout 0.1 the
    # imagenet step on v5e:4x4 needed 2.38 GiB of temporaries per chip without it, 1.96 with
    # it (docs/model.md).
    mlp = Mlp if on_cpu(self.platform) or not self.dropout else nn.remat(
        Mlp, static_argnums=(2, 3), policy=jax.checkpoint_policies.dots_saveable)
    y = mlp(self.mlp_dim, self.dropout, self.dtype, self.torch_init, self.platform,
            name='mlp')(h, deterministic, defer_fc2, noise)
    return (residual, y) if defer_fc2 else y + residual


def pool_tokens(x, pool: str):
  """[batch, tokens, D] -> [batch, D]; both poolings are linear, so they commute with sums."""
  return x[:, 0] if pool == 'cls' else x.mean(axis=1)


class Branch(nn.Module):
  """One branch: `depth` blocks in sequence, then pooling (cls token or mean)."""
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float
  style: str
  pool: str
  dtype: Any
  platform: str | None = None
  torch_init: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool, first=None, defer_fc2: bool = False,
               noise=None):
    """`first`, `defer_fc2`: see `Block`; the fused stack's start of block 0 and its
    end of the last block, for which this returns (pooled residual, pooled MLP hidden).
    `noise`: see `Dropout`."""
    for i in range(self.depth):
      last = i == self.depth - 1
      x = Block(self.num_heads, self.mlp_dim, self.dropout, self.style, self.dtype,
                self.platform, self.torch_init, name=f'block{i}')(
                    x, deterministic, last and self.pool == 'cls', first if i == 0 else None,
                    last and defer_fc2, noise)
    if defer_fc2:
      return tuple(pool_tokens(a, self.pool) for a in x)
    return pool_tokens(x, self.pool)


class BranchStack(nn.Module):
  """`num_branches` branches with stacked parameters (leading axis = branch).

  Every branch reads the same tokens; returns each branch's pooled output, [branches, batch, D],
  or with `summed` their sum, [batch, D].
  `strategy` says how the local branches run; all give the same parameter tree and result:
    'vmap': all at once (every branch's activations alive together);
    'scan': one after the other in a `lax.scan` loop: memory holds one branch's activations
      (in training the backward pass still keeps every branch's residuals);
    'unrolled': the same loop unrolled into one program, which XLA can schedule freely:
      the fastest on a CPU from batch ~4 up (measured 1.3x 'vmap' in training), but the
      branches may overlap in memory;
    'fused': as 'vmap', but the start of block 0, which every branch applies to the same
      tokens, runs once for all: one set of LayerNorm statistics and one wide qkv matmul
      with each branch's LayerNorm scale and bias folded into its weights (exact algebra);
      and, when only the sum is wanted, every branch's last fc2 and the sum over branches
      are one matmul over the concatenated hidden axis (`_fused_last_fc2`);
    'auto': `auto_strategy` picks one from the target platform and the work per branch.
  """
  num_branches: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float
  style: str
  pool: str
  dtype: Any
  strategy: str = 'vmap'
  platform: str | None = None  # of the devices it runs on; None: JAX's default backend
  torch_init: bool = False

  @nn.compact
  def __call__(self, tokens, deterministic: bool, summed: bool = False, noise=None):
    """`noise` = (key, rows [batch], branch indices [num_branches]) for `Dropout`; None: the
    'dropout' key, rows 0..batch-1, branches 0..num_branches-1."""
    if noise is None:
      key = None if deterministic or not self.dropout else self.make_rng('dropout')
      noise = (key, jnp.arange(tokens.shape[0]), jnp.arange(self.num_branches))
    key, rows, branch_ids = noise
    branch_args = (self.depth, self.num_heads, self.mlp_dim, self.dropout, self.style,
                   self.pool, self.dtype, self.platform, self.torch_init)
    stacked = dict(variable_axes={'params': 0}, split_rngs={'params': True})
    strategy = self.strategy
    if strategy == 'auto':
      strategy = auto_strategy(self.num_branches, tokens.shape[0] * tokens.shape[1],
                               self.mlp_dim * jnp.dtype(self.dtype).itemsize, self.platform)
    with jax.named_scope(f'branches_{strategy}'):
      out = self._run(strategy, branch_args, stacked, tokens, deterministic, summed, key,
                      rows, branch_ids)
    return out

  def _run(self, strategy, branch_args, stacked, tokens, deterministic, summed, key, rows,
           branch_ids):
    if strategy in ('scan', 'unrolled'):
      body = lambda branch, carry, t, d, k, r, b: (carry, branch(t, d, noise=(k, r, b)))
      branches = nn.scan(body, in_axes=(nn.broadcast,) * 4 + (0,),
                         length=self.num_branches, unroll=strategy == 'unrolled', **stacked)
      out = branches(Branch(*branch_args, name='branch'), None, tokens, deterministic, key,
                     rows, branch_ids)[1]
      return out.sum(axis=0) if summed else out
    branches = nn.vmap(Branch, in_axes=(None, None, 0, None, (None, None, 0)), out_axes=0,
                       axis_size=self.num_branches, **stacked)(*branch_args, name='branch')
    fused = strategy == 'fused' and not self.is_initializing()
    first = self._fused_block0_start(tokens) if fused else None
    # fc2 is applied after pooling; dropout on its output per token would not commute.
    fuse_fc2 = fused and summed and (deterministic or self.dropout == 0)
    out = branches(tokens, deterministic, first, fuse_fc2, (key, rows, branch_ids))
    if fuse_fc2:
      return self._fused_last_fc2(*out)
    return out.sum(axis=0) if summed else out

  def _fused_block0_start(self, tokens):
    """(LN(x) per branch or None, qkv per branch) of every branch's block 0, computed once.

    LN_i(x) = n * g_i + b_i with n = (x - mean) / std shared by all branches, so
    LN_i(x) @ W_i = n @ (g_i W_i) + b_i W_i: one [D, branches * 3 * inner] matmul.
    """
    p = self.variables['params']['branch']['block0']
    g, b = p['norm1']['scale'], p['norm1']['bias']  # [branches, D]
    w = p['attn']['qkv']['kernel']  # [branches, D, 3, heads, head_dim]
    n = nn.LayerNorm(LN_EPSILON[self.style], use_scale=False, use_bias=False,
                     dtype=self.dtype, name='shared_norm')(tokens)
    wide = jnp.einsum('ld,ldsnh->dlsnh', g, w).astype(self.dtype)
    bias = jnp.einsum('ld,ldsnh->lsnh', b, w).astype(self.dtype)[:, None, None]
    qkv = jnp.einsum('btd,dlsnh->lbtsnh', n, wide) + bias
    qkv = tuple(qkv[:, :, :, i].transpose(0, 1, 3, 2, 4) for i in range(3))  # [l, b, n, t, h]
    h = n * g[:, None, None].astype(self.dtype) + b[:, None, None].astype(self.dtype)
    return (h if self.style == 'reference' else None), qkv

  def _fused_last_fc2(self, residual, hidden):
    """sum_i (residual_i + hidden_i @ W2_i + b2_i) as one matmul over the concatenated
    hidden axis: [batch, branches x mlp] @ [branches x mlp, D]. Both inputs come pooled: fc2
    is linear, so pooling first is exact (with mean pooling it saves fc2 on every token)."""
    fc2 = self.variables['params']['branch'][f'block{self.depth - 1}']['mlp']['fc2']
    w, b = (fc2[k].astype(self.dtype) for k in ('kernel', 'bias'))
    return residual.sum(axis=0) + jnp.einsum('lbh,lhd->bd', hidden, w) + b.sum(axis=0)


# Above this size of one branch's MLP activations, 'auto' on CPU runs branches strictly one
# at a time ('scan'): in an unrolled program XLA:CPU's concurrency-minded scheduler overlaps
# branches, and memory grows towards that of 'vmap' (docs/benchmarks.md).
SCAN_ABOVE_BYTES = 32 * 2**20


def auto_strategy(local_branches: int, tokens_per_branch: int, bytes_per_mlp_row: int,
                  platform: str | None = None) -> str:
  """The branch strategy 'auto' runs, from the target platform (default: JAX's backend) and
  the work per branch.

  Chosen from the measurements in docs/benchmarks.md (a 2-core CPU). Other platforms have
  not been measured here: they get 'fused', the batched form accelerators like best.
  """
  if local_branches == 1:
    return 'unrolled'  # one branch: a plain program, no batch axis of size 1
  if not on_cpu(platform):
    return 'fused'
  if tokens_per_branch < 256:
    return 'vmap'  # ~ batch 1-3: one batched op beats a row of tiny ones
  if tokens_per_branch * bytes_per_mlp_row >= SCAN_ABOVE_BYTES:
    return 'scan'
  return 'unrolled'


class PatchEmbed(nn.Module):
  """Patches -> Dense, then a learned cls token and position embedding; shared by all branches.

  posemb='sincos2d': big_vision's fixed 2-D sin-cos embedding, added to the patches before the
  cls token joins them (the cls token has no position, as in big_vision)."""
  patch_size: int
  width: int
  dropout: float
  torch_init: bool
  dtype: Any
  platform: str | None = None
  posemb: str = 'learned'

  @nn.compact
  def __call__(self, images, deterministic: bool, noise=None):
    """`noise`: (key, each image's row in the global batch, None); see `Dropout`."""
    b, h, w, c = images.shape
    p = self.patch_size
    check_patchable(h, w, p)
    # (p1 p2 c) order inside a patch, as in the authors' einops rearrange.
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    x = dense(self.width, self.torch_init, x.shape[-1], dtype=self.dtype, name='patch')(x)
    # The authors draw cls and positions from N(0, 1); ViT's usual choice is 0.02.
    init = nn.initializers.normal(1.0 if self.torch_init else 0.02)
    cls = self.param('cls', init, (1, 1, self.width))
    if self.posemb == 'sincos2d':
      x = x + posemb_sincos_2d(h // p, w // p, self.width).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    if self.posemb == 'learned':
      x = x + self.param('pos', init, (1, x.shape[1], self.width)).astype(x.dtype)
    return Dropout(self.dropout, self.platform)(x, deterministic, noise)


class Head(nn.Module):
  """LayerNorm + Dense on pooled features; works on any leading axes (e.g. one per prefix).

  `pre_logits` puts big_vision's pre-logits layer (Dense(width) + tanh, `rep_size=True`)
  between the two; `zero_init` starts the last Dense at zero (big_vision's `head_zeroinit`).
  Without `has_norm` it is the last Dense alone, applied to features `normalize`d elsewhere
  (expansion: the new classes' rows beside the frozen old head, whose LayerNorm and pre-logits
  they share).
  """
  num_classes: int
  width: int
  dtype: Any
  epsilon: float = 1e-6
  torch_init: bool = False
  has_norm: bool = True
  pre_logits: bool = False
  zero_init: bool = False

  def setup(self):
    if self.has_norm:
      self.norm = nn.LayerNorm(self.epsilon, dtype=self.dtype)
      if self.pre_logits:
        self.pre = dense(self.width, self.torch_init, self.width, dtype=self.dtype)
    init = dict(kernel_init=nn.initializers.zeros) if self.zero_init else {}
    self.out = dense(self.num_classes, self.torch_init and not self.zero_init, self.width,
                     dtype=self.dtype, **init)

  def normalize(self, pooled):
    x = self.norm(pooled)
    return jnp.tanh(self.pre(x)) if self.pre_logits else x

  def __call__(self, pooled, normalized: bool = False):
    x = pooled if normalized else self.normalize(pooled)
    return self.out(x).astype(jnp.float32)


class ParaFormer(nn.Module):
  """ParaFormer: `num_branches` parallel branches of `branch_depth` blocks, outputs summed.

  The branches are summed *after* pooling: the cls token and the token mean are linear, so
  pool(sum) == sum(pool), and under branch sharding the `psum` moves [batch, D] instead of
  [batch, tokens, D]. The same fact gives every prefix of branches from one pass.

  `branch_axis` and `data_axis` are set only inside `jax.shard_map` (see `sharding.py`): the
  module then holds its device's local branches and slice of the batch, and sums over the
  mesh axis `branch_axis`. `platform` is that of the mesh's devices (the compile target,
  which may not be this host's): it chooses the attention and branch-stack implementations.

  `num_frozen_branches` (stagewise training) puts the first F branches in a stack of their
  own, `params['frozen_branches']`, ahead of the `num_branches` trained ones in
  `params['branches']`, so that the trainer can leave them out of differentiation and of the
  optimizer. `merge_frozen` turns such parameters back into one stack.

  `num_frozen_classes` (expansion) likewise puts the head of the first C classes (its
  LayerNorm and their rows) in `params['frozen_head']`; `params['head']` then holds only the
  new classes' rows, so that frozen rows get no gradient and no optimizer state.
  """
  num_classes: int
  patch_size: int = 4
  width: int = 192
  num_heads: int = 3
  mlp_dim: int = 768
  num_branches: int = 8
  branch_depth: int = 2
  dropout: float = 0.0
  block_style: str = 'prenorm'
  pool: str = 'cls'
  posemb: str = 'learned'  # or 'sincos2d' (fixed; see PatchEmbed)
  pre_logits: bool = False  # Dense(width) + tanh before the head's last layer
  head_zero_init: bool = False
  dtype: Any = jnp.float32
  branch_strategy: str = 'auto'
  # Initial values: 'torch' (the authors': torch's nn.Linear defaults, cls and positions
  # N(0, 1)), 'jax' (Flax's defaults, cls and positions N(0, 0.02)); 'auto': torch in
  # reference style.
  param_init: str = 'auto'
  num_frozen_branches: int = 0
  num_frozen_classes: int = 0
  branch_axis: str | None = None
  data_axis: str | None = None
  platform: str | None = None

  def setup(self):
    if self.block_style not in BLOCK_STYLES:
      raise ValueError(f'block_style={self.block_style!r}; choose one of {BLOCK_STYLES}.')
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; choose one of {POOLS}.')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb={self.posemb!r}; choose one of {POSEMBS}.')
    if self.branch_strategy not in BRANCH_STRATEGIES:
      raise ValueError(f'branch_strategy={self.branch_strategy!r}; choose one of '
                       f'{BRANCH_STRATEGIES}.')
    if self.param_init not in INITS:
      raise ValueError(f'param_init={self.param_init!r}; choose one of {INITS}.')
    torch = self.param_init == 'torch' or (self.param_init == 'auto' and
                                           self.block_style == 'reference')
    self.embed = PatchEmbed(self.patch_size, self.width, self.dropout, torch, self.dtype,
                            self.platform, self.posemb)
    stack = lambda n: BranchStack(n, self.branch_depth, self.num_heads, self.mlp_dim,
                                  self.dropout, self.block_style, self.pool, self.dtype,
                                  self.branch_strategy, self.platform, torch)
    self.frozen_branches = stack(self.num_frozen_branches) if self.num_frozen_branches else None
    self.branches = stack(self.num_branches)
    head = lambda n, has_norm=True: Head(n, self.width, self.dtype,
                                         LN_EPSILON[self.block_style], torch, has_norm,
                                         self.pre_logits, self.head_zero_init)
    if self.num_frozen_classes:
      self.frozen_head = head(self.num_frozen_classes)
      self.head = head(self.num_classes - self.num_frozen_classes, has_norm=False)
    else:
      self.frozen_head, self.head = None, head(self.num_classes)

  def logits(self, pooled):
    """The head on pooled features (any leading axes): [..., classes]."""
    if self.frozen_head is None:
      return self.head(pooled)
    x = self.frozen_head.normalize(pooled)
    return jnp.concatenate([self.frozen_head(x, normalized=True), self.head(x, normalized=True)],
                           axis=-1)

  def pooled_branch_outputs(self, images, train: bool = False, summed: bool = False):
    """Pooled outputs of each stack's (local) branches: a list of [branches, batch, D], or
    with `summed` of their sums over branches, [batch, D]."""
    rows = self._global_index(self.data_axis, images.shape[0])
    key = self.make_rng('dropout') if train and self.dropout else None
    tokens = self.embed(images, not train, (key, rows, None))
    stacks = [self.branches] if self.frozen_branches is None else [self.frozen_branches,
                                                                    self.branches]
    # Global branch indices: frozen branches first, then the trained ones.
    offsets = [0] if self.frozen_branches is None else [0, self.num_frozen_branches]
    # Frozen branches (stagewise, expansion) run without dropout: they are not trained, and
    # the branches trained beside them then learn on the features they will see at test time.
    return [s(tokens, not train or s is self.frozen_branches, summed,
              (key, rows, offset + self._global_index(self.branch_axis, s.num_branches)))
            for s, offset in zip(stacks, offsets)]

  @staticmethod
  def _global_index(axis, local: int):
    """Indices of this device's `local` consecutive items along mesh `axis`, in the whole."""
    start = 0 if axis is None else jax.lax.axis_index(axis) * local
    return start + jnp.arange(local)

  def __call__(self, images, train: bool = False):
    """Logits of the full model, [batch, classes]."""
    pooled = sum(self.pooled_branch_outputs(images, train, summed=True))
    if self.branch_axis is not None:
      pooled = jax.lax.psum(pooled, self.branch_axis)
    return self.logits(pooled)

  def prefix_logits(self, images, train: bool = False):
    """Anytime outputs: logits of branches 1..k for every k = 1..L, [L, batch, classes]."""
    pooled = [self._all_branches(p) for p in self.pooled_branch_outputs(images, train)]
    return self.logits(jnp.cumsum(jnp.concatenate(pooled, axis=0), axis=0))

  def _all_branches(self, pooled):
    """[local branches, ...] -> [all branches, ...] in global order, on every device."""
    if self.branch_axis is None:
      return pooled
    # Each device writes its branches into their global slots; a psum (unlike all_gather)
    # leaves a result that shard_map's check_vma knows to be the same on every device.
    local = pooled.shape[0]
    full = jnp.zeros((local * jax.lax.axis_size(self.branch_axis),) + pooled.shape[1:],
                     pooled.dtype)
    start = jax.lax.axis_index(self.branch_axis) * local
    return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(full, pooled, start, 0),
                        self.branch_axis)


def check_patchable(height: int, width: int, patch_size: int):
  if height % patch_size or width % patch_size:
    raise ValueError(
        f'Image size {height}x{width} is not divisible by patch_size={patch_size}. Resize the '
        f'images (config.data.image_size) to a multiple of {patch_size} or pick a patch size '
        f'that divides both sides.')


def sequential_baseline(depth: int, **kwargs) -> ParaFormer:
  """The sequential ViT of `depth` blocks: a ParaFormer with one branch of that depth."""
  return ParaFormer(num_branches=1, branch_depth=depth, **kwargs)


def merge_frozen_params(params):
  """params with 'frozen_branches' (if any) joined to 'branches' in one stack, frozen first,
  and a 'frozen_head' (if any) joined to 'head', its rows first."""
  merged = {k: v for k, v in params.items() if k not in ('frozen_branches', 'frozen_head')}
  if 'frozen_branches' in params:
    merged['branches'] = jax.tree.map(lambda f, t: jnp.concatenate([f, t]),
                                      params['frozen_branches'], params['branches'])
  if 'frozen_head' in params:
    frozen = params['frozen_head']
    merged['head'] = {**frozen, 'out': jax.tree.map(  # its norm (and pre-logits), all rows
        lambda f, t: jnp.concatenate([f, t], axis=-1), frozen['out'], params['head']['out'])}
  return merged


def merge_frozen(model: ParaFormer, params):
  """(model, params) with frozen and trained branches as one stack, frozen ones first, and
  one head."""
  if not (model.num_frozen_branches or model.num_frozen_classes):
    return model, params
  total = model.num_frozen_branches + model.num_branches
  return (model.clone(num_branches=total, num_frozen_branches=0, num_frozen_classes=0),
          merge_frozen_params(params))


def first_branches(model: ParaFormer, params, k: int):
  """The model restricted to its first k branches: (model with k branches, sliced params)."""
  if not 1 <= k <= model.num_branches:
    raise ValueError(f'k={k} branches requested from a model with {model.num_branches}.')
  sliced = dict(params)
  sliced['branches'] = jax.tree.map(lambda a: a[:k], params['branches'])
  return model.clone(num_branches=k), sliced


def param_count(params) -> int:
  return sum(int(a.size) for a in jax.tree.leaves(params))
