"""Analytic FLOP counts (2 x in x out per Dense per token, 2 x 2 x T^2 x inner per attention)."""
from paraformer_jax.model import HEAD_DIM, ParaFormer


def forward_flops(model: ParaFormer, image_size: int, channels: int = 3) -> float:
  """FLOPs of one image's forward pass; a training step costs about 3x this."""
  patches = (image_size // model.patch_size) ** 2
  tokens = patches + 1
  d, inner = model.width, model.num_heads * HEAD_DIM
  per_token = 2 * d * 3 * inner + 2 * inner * d + 2 * 2 * d * model.mlp_dim
  attention = 2 * 2 * tokens ** 2 * inner
  blocks = model.num_branches * model.branch_depth
  embed = patches * 2 * model.patch_size ** 2 * channels * d
  head = 2 * d * model.num_classes
  return blocks * (tokens * per_token + attention) + embed + head
