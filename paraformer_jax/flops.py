"""Analytic FLOP counts (2 x in x out per Dense per token, 2 x 2 x T^2 x inner per attention)."""
from paraformer_jax.model import HEAD_DIM, ParaFormer


def forward_flops(model: ParaFormer, image_size: int, channels: int = 3,
                  executed: bool = False) -> float:
  """FLOPs of one image's forward pass; a training step costs about 3x this.

  By default every block counts in full (the figure the issues quote, 0.973 GFLOP for the
  32 px 8x2 model). `executed=True` counts what runs: under cls pooling a branch's last block
  computes keys and values for every token but the query, attention, projection and MLP for
  the cls token only (the query for every token below `model.SPLIT_QUERY_ROWS` rows per
  batch, not counted here).
  """
  patches = (image_size // model.patch_size) ** 2
  tokens = patches + 1
  d, inner = model.width, model.num_heads * HEAD_DIM
  qkv, rest = 2 * d * 3 * inner, 2 * inner * d + 2 * 2 * d * model.mlp_dim
  full_block = tokens * (qkv + rest) + 2 * 2 * tokens ** 2 * inner
  cls_block = tokens * qkv * 2 // 3 + qkv // 3 + 2 * 2 * tokens * inner + rest
  last = cls_block if executed and model.pool == 'cls' else full_block
  blocks = model.num_branches * ((model.branch_depth - 1) * full_block + last)
  embed = patches * 2 * model.patch_size ** 2 * channels * d
  head = 2 * d * model.num_classes
  return blocks + embed + head
