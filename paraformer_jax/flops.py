"""Analytic FLOP counts (2 x in x out per Dense per token, 2 x 2 x T^2 x inner per attention)."""
from paraformer_jax.model import HEAD_DIM, ParaFormer


def forward_flops(model: ParaFormer, image_size: int, channels: int = 3,
                  executed: bool = False) -> float:
  """FLOPs of one image's forward pass; a training step costs about 3x this.

  By default every block counts in full (0.973 GFLOP for the
  32 px 8x2 model). `executed=True` counts what runs: under cls pooling a branch's last block
  computes keys and values for every token but the query, attention, projection and MLP for
  the cls token only (the query for every token below `model.SPLIT_QUERY_ROWS` rows per
  batch, not counted here).
  """
  branch, embed, head = _parts(model, image_size, channels, executed)
  return model.num_branches * branch + embed + head


def _parts(model: ParaFormer, image_size: int, channels: int, executed: bool):
  """FLOPs per image of (one branch, the patch embedding, the head), forward."""
  patches = (image_size // model.patch_size) ** 2
  tokens = patches + 1
  d, inner = model.width, model.num_heads * HEAD_DIM
  qkv, rest = 2 * d * 3 * inner, 2 * inner * d + 2 * 2 * d * model.mlp_dim
  full_block = tokens * (qkv + rest) + 2 * 2 * tokens ** 2 * inner
  cls_block = tokens * qkv * 2 // 3 + qkv // 3 + 2 * 2 * tokens * inner + rest
  last = cls_block if executed and model.pool == 'cls' else full_block
  branch = (model.branch_depth - 1) * full_block + last
  embed = patches * 2 * model.patch_size ** 2 * channels * d
  head = 2 * d * model.num_classes
  return branch, embed, head


def train_step_flops(model: ParaFormer, image_size: int, channels: int, batch: int,
                     lpa_pass: bool = False) -> float:
  """FLOPs one training step executes (the executed count above): the forward pass, and
  twice it for the backward pass of what trains (frozen branches run forward only). An LPA
  pass step makes one update per prefix k = 1..L, each over the first k branches."""
  branch, embed, head = _parts(model, image_size, channels, executed=True)
  if lpa_pass:
    return batch * sum(3 * (embed + k * branch + head)
                       for k in range(1, model.num_branches + 1))
  trained = model.num_branches - model.num_frozen_branches
  forward = embed + model.num_branches * branch + head
  return batch * (forward + 2 * (embed + trained * branch + head))
