"""The ParaFormer model: a shared patch embedding, L parallel branches of M blocks, one head.

Flax Linen (not NNX) because its parameters are plain pytrees: taking the first k branches,
freezing some and appending new ones are array operations on the leading branch axis of
`params['branches']`, with no split/merge round trip.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD_DIM = 64  # the papers' (and vit-pytorch's) head width
BLOCK_STYLES = ('prenorm', 'reference')
POOLS = ('cls', 'mean')


class Attention(nn.Module):
  """Multi-head self-attention; qkv without bias, as in the authors' code."""
  num_heads: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic: bool):
    qkv = nn.DenseGeneral((3, self.num_heads, HEAD_DIM), use_bias=False, dtype=self.dtype,
                          name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]
    # jax.nn.dot_product_attention picks fused kernels (cuDNN flash attention) where they exist.
    y = jax.nn.dot_product_attention(q, k, v)
    y = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dtype=self.dtype, name='out')(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Mlp(nn.Module):
  mlp_dim: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1')(x)
    y = nn.Dropout(self.dropout)(nn.gelu(y, approximate=False), deterministic=deterministic)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  """Attention then MLP, each behind a LayerNorm.

  `prenorm`: y = x + f(LN(x)), the usual pre-norm residual.
  `reference`: y = f(LN(x)) + LN(x), the residual of the authors' published code, kept so
  that results and weights can be compared with it.
  """
  num_heads: int
  mlp_dim: int
  dropout: float
  style: str
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic: bool):
    h = nn.LayerNorm(dtype=self.dtype, name='norm1')(x)
    y = Attention(self.num_heads, self.dropout, self.dtype, name='attn')(h, deterministic)
    x = y + (h if self.style == 'reference' else x)
    h = nn.LayerNorm(dtype=self.dtype, name='norm2')(x)
    y = Mlp(self.mlp_dim, self.dropout, self.dtype, name='mlp')(h, deterministic)
    return y + (h if self.style == 'reference' else x)


class Branch(nn.Module):
  """One branch: `depth` blocks in sequence."""
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float
  style: str
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic: bool):
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, self.dropout, self.style, self.dtype,
                name=f'block{i}')(x, deterministic)
    return x


class BranchStack(nn.Module):
  """`num_branches` branches with stacked parameters (leading axis = branch).

  Every branch reads the same tokens; returns each branch's output, [branches, batch, tokens, D].
  """
  num_branches: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float
  style: str
  dtype: Any

  @nn.compact
  def __call__(self, tokens, deterministic: bool):
    stacked = nn.vmap(Branch, in_axes=(None, None), out_axes=0, axis_size=self.num_branches,
                      variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True})
    return stacked(self.depth, self.num_heads, self.mlp_dim, self.dropout, self.style,
                   self.dtype, name='branch')(tokens, deterministic)


class PatchEmbed(nn.Module):
  """Patches -> Dense, then a learned cls token and position embedding; shared by all branches."""
  patch_size: int
  width: int
  dropout: float
  reference_init: bool
  dtype: Any

  @nn.compact
  def __call__(self, images, deterministic: bool):
    b, h, w, c = images.shape
    p = self.patch_size
    check_patchable(h, w, p)
    # (p1 p2 c) order inside a patch, as in the authors' einops rearrange.
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    x = nn.Dense(self.width, dtype=self.dtype, name='patch')(x)
    # The authors draw cls and positions from N(0, 1); ViT's usual choice is 0.02.
    init = nn.initializers.normal(1.0 if self.reference_init else 0.02)
    cls = self.param('cls', init, (1, 1, self.width))
    pos = self.param('pos', init, (1, x.shape[1] + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    x = x + pos.astype(x.dtype)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Head(nn.Module):
  """LayerNorm + Dense on pooled features; works on any leading axes (e.g. one per prefix)."""
  num_classes: int
  dtype: Any

  @nn.compact
  def __call__(self, pooled):
    x = nn.LayerNorm(dtype=self.dtype, name='norm')(pooled)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='out')(x).astype(jnp.float32)


class ParaFormer(nn.Module):
  """ParaFormer: `num_branches` parallel branches of `branch_depth` blocks, outputs summed.

  The branches are summed *after* pooling: the cls token and the token mean are linear, so
  pool(sum) == sum(pool), and under branch sharding the `psum` moves [batch, D] instead of
  [batch, tokens, D]. The same fact gives every prefix of branches from one pass.

  `branch_axis` is set only inside `jax.shard_map` (see `sharding.py`): the module then holds
  its device's local branches and sums over the mesh axis of that name.
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
  dtype: Any = jnp.float32
  branch_axis: str | None = None

  def setup(self):
    if self.block_style not in BLOCK_STYLES:
      raise ValueError(f'block_style={self.block_style!r}; choose one of {BLOCK_STYLES}.')
    if self.pool not in POOLS:
      raise ValueError(f'pool={self.pool!r}; choose one of {POOLS}.')
    reference = self.block_style == 'reference'
    self.embed = PatchEmbed(self.patch_size, self.width, self.dropout, reference, self.dtype)
    self.branches = BranchStack(self.num_branches, self.branch_depth, self.num_heads,
                                self.mlp_dim, self.dropout, self.block_style, self.dtype)
    self.head = Head(self.num_classes, self.dtype)

  def pooled_branch_outputs(self, images, train: bool = False):
    """Each (local) branch's pooled output, [branches, batch, D]."""
    tokens = self.embed(images, not train)
    out = self.branches(tokens, not train)
    return out[:, :, 0] if self.pool == 'cls' else out.mean(axis=2)

  def __call__(self, images, train: bool = False):
    """Logits of the full model, [batch, classes]."""
    pooled = self.pooled_branch_outputs(images, train).sum(axis=0)
    if self.branch_axis is not None:
      pooled = jax.lax.psum(pooled, self.branch_axis)
    return self.head(pooled)

  def prefix_logits(self, images, train: bool = False):
    """Anytime outputs: logits of branches 1..k for every k = 1..L, [L, batch, classes]."""
    pooled = self.pooled_branch_outputs(images, train)
    if self.branch_axis is not None:
      # Each device writes its branches into their global slots; a psum (unlike all_gather)
      # leaves a result that shard_map's check_vma knows to be the same on every device.
      local = pooled.shape[0]
      full = jnp.zeros((local * jax.lax.axis_size(self.branch_axis),) + pooled.shape[1:],
                       pooled.dtype)
      start = jax.lax.axis_index(self.branch_axis) * local
      pooled = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(full, pooled, start, 0),
                            self.branch_axis)
    return self.head(jnp.cumsum(pooled, axis=0))


def check_patchable(height: int, width: int, patch_size: int):
  if height % patch_size or width % patch_size:
    raise ValueError(
        f'Image size {height}x{width} is not divisible by patch_size={patch_size}. Resize the '
        f'images (config.data.image_size) to a multiple of {patch_size} or pick a patch size '
        f'that divides both sides.')


def sequential_baseline(depth: int, **kwargs) -> ParaFormer:
  """The sequential ViT of `depth` blocks: a ParaFormer with one branch of that depth."""
  return ParaFormer(num_branches=1, branch_depth=depth, **kwargs)


def first_branches(model: ParaFormer, params, k: int):
  """The model restricted to its first k branches: (model with k branches, sliced params)."""
  if not 1 <= k <= model.num_branches:
    raise ValueError(f'k={k} branches requested from a model with {model.num_branches}.')
  sliced = dict(params)
  sliced['branches'] = jax.tree.map(lambda a: a[:k], params['branches'])
  return model.clone(num_branches=k), sliced


def param_count(params) -> int:
  return sum(int(a.size) for a in jax.tree.leaves(params))
