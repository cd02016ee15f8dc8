"""Analytic FLOP counts (2 x in x out per Dense per token, 2 x 2 x T^2 x inner per attention).

A model's branches are its frozen ones (`num_frozen_branches`, forward only unless the
embedding below them trains) followed by its trained ones (`num_branches`).
"""
from paraformer_jax.model import HEAD_DIM, ParaFormer


def forward_flops(model: ParaFormer, image_size: int, channels: int = 3,
                  executed: bool = False) -> float:
  """FLOPs of one image's forward pass through every branch; a training step costs about 3x.

  By default every block counts in full (0.973 GFLOP for the
  32 px 8x2 model). `executed=True` counts what runs: under cls pooling a branch's last block
  computes keys and values for every token but the query, attention, projection and MLP for
  the cls token only (the query for every token below `model.SPLIT_QUERY_ROWS` rows per
  batch, not counted here).
  """
  branch, embed, head, _ = _parts(model, image_size, channels, executed)
  return (model.num_frozen_branches + model.num_branches) * branch + embed + head


def _parts(model: ParaFormer, image_size: int, channels: int, executed: bool):
  """FLOPs per image of (one branch, the patch embedding, the head, one branch's products of
  activations with activations: queries with keys, weights with values), forward."""
  patches = (image_size // model.patch_size) ** 2
  tokens = patches + 1
  d, inner = model.width, model.num_heads * HEAD_DIM
  qkv, rest = 2 * d * 3 * inner, 2 * inner * d + 2 * 2 * d * model.mlp_dim
  full_attention, cls_attention = 2 * 2 * tokens ** 2 * inner, 2 * 2 * tokens * inner
  full_block = tokens * (qkv + rest) + full_attention
  cls_block = tokens * qkv * 2 // 3 + qkv // 3 + cls_attention + rest
  cls_last = executed and model.pool == 'cls'
  branch = (model.branch_depth - 1) * full_block + (cls_block if cls_last else full_block)
  attention = (model.branch_depth - 1) * full_attention + (
      cls_attention if cls_last else full_attention)
  embed = patches * 2 * model.patch_size ** 2 * channels * d
  head = 2 * d * model.num_classes
  return branch, embed, head, attention


def train_step_flops(model: ParaFormer, image_size: int, channels: int, batch: int,
                     lpa_pass: bool = False, frozen_keys=(), static_prefixes: bool = True
                     ) -> float:
  """FLOPs one training step executes (the executed count above), never negative.

  The backward pass costs, per part, its forward for the gradient of its weights when it
  trains, and again for the gradient of its input when a trained part lies below it: the
  trained branches and the head twice their forward, frozen branches nothing, or, when the
  embedding trains (`'embed'` not in `frozen_keys`), the gradient of their input (once their
  forward, twice for the products of activations with activations: both sides need one).
  The embedding costs once its forward when it trains.
  An LPA pass step makes one update per prefix k = 1..L: over the first k branches when
  `static_prefixes` (steps.py: a branch axis of 1), else over the whole model each time.
  """
  branch, embed, head, attention = _parts(model, image_size, channels, executed=True)
  embed_trains = 'embed' not in frozen_keys
  if lpa_pass:
    sizes = (range(1, model.num_branches + 1) if static_prefixes
             else [model.num_branches] * model.num_branches)
    return batch * sum(3 * (embed + k * branch + head) for k in sizes)
  frozen, trained = model.num_frozen_branches, model.num_branches
  forward = embed + (frozen + trained) * branch + head
  through_frozen = frozen * (branch + attention)
  backward = 2 * trained * branch + 2 * head + (embed + through_frozen if embed_trains else 0)
  return batch * (forward + backward)
