"""Mixup and CutMix on training batches, with the labels mixed by the same weights.

Rows are mixed in pairs of neighbours of the *global* batch (rows 2k and 2k+1), each pair
with its own weight drawn from (seed, batch, pair): a process that loads part of the batch
mixes its rows exactly as a single process would, so training does not depend on how many
hosts share the input. Within a pair, a' = lam a + (1 - lam) b and b' = lam b + (1 - lam) a
(CutMix: b's box pasted into a and a's into b, lam the area left). With both on, each pair
takes one of the two at random (DeiT's switch probability 0.5).
"""
import jax
import jax.numpy as jnp
import numpy as np


def cutmix_box(height: int, width: int, lam: float, rng):
  """(top, left, h, w) of a box of about 1 - lam of the image, centred uniformly, clipped."""
  cut = np.sqrt(1.0 - lam)
  ch, cw = int(height * cut), int(width * cut)
  cy, cx = rng.integers(0, height), rng.integers(0, width)
  top, bottom = np.clip([cy - ch // 2, cy + ch - ch // 2], 0, height)
  left, right = np.clip([cx - cw // 2, cx + cw - cw // 2], 0, width)
  return int(top), int(left), int(bottom - top), int(right - left)


def pair_params(mask, mixup: float, cutmix: float, seed: int, b: int, first_row: int,
                height: int, width: int):
  """Per row of a process's part of global batch b (starting at global row `first_row`,
  even): lam, the weight of the row's own label (1: unmixed), and the CutMix box
  (top, left, h, w; zero area: mixup). A pair with an unreadable row (mask 0) is left
  unmixed, so a skipped image never leaks into its neighbour. Cheap: run where the batch is
  made (a grain worker), applied by `apply` on device."""
  rows = len(mask)
  lam, box = np.ones(rows, np.float32), np.zeros((rows, 4), np.int32)
  for r in range(0, rows - 1, 2):
    if not (mask[r] and mask[r + 1]):
      continue
    rng = np.random.default_rng((seed, b, (first_row + r) // 2))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    weight = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    if use_cutmix:
      top, left, h, w = cutmix_box(height, width, weight, rng)
      box[r] = box[r + 1] = (top, left, h, w)
      weight = 1.0 - h * w / (height * width)
    lam[r] = lam[r + 1] = weight
  return lam, box


def apply(images, labels, lam, box, num_classes: int):
  """(mixed images, soft labels [rows, num_classes]), in jnp: runs on device, in the jitted
  `input_pipeline.finish`. Rows 2k and 2k+1 are partners; lam = 1 leaves a row as it is."""
  rows, height, width = images.shape[:3]
  swap = lambda x: x.reshape((rows // 2, 2) + x.shape[1:])[:, ::-1].reshape(x.shape)
  partner = swap(images)
  top, left, h, w = (box[:, i, None, None] for i in range(4))
  ys, xs = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  inside = ((ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w))[..., None]
  weight = lam[:, None, None, None]
  blended = weight * images + (1 - weight) * partner
  cut = (h * w > 0)[..., None]
  mixed = jnp.where(cut, jnp.where(inside, partner, images), blended)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  soft = lam[:, None] * onehot + (1 - lam[:, None]) * swap(onehot)
  return mixed, soft

