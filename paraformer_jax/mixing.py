"""Mixup and CutMix on training batches, with the labels mixed by the same weights.

Rows are mixed in pairs of neighbours of the *global* batch (rows 2k and 2k+1), each pair
with its own weight drawn from (seed, batch, pair): a process that loads part of the batch
mixes its rows exactly as a single process would, so training does not depend on how many
hosts share the input. Within a pair, a' = lam a + (1 - lam) b and b' = lam b + (1 - lam) a
(CutMix: b's box pasted into a and a's into b, lam the area left). With both on, each pair
takes one of the two at random (DeiT's switch probability 0.5).
"""
import numpy as np


def cutmix_box(height: int, width: int, lam: float, rng):
  """(top, left, h, w) of a box of about 1 - lam of the image, centred uniformly, clipped."""
  cut = np.sqrt(1.0 - lam)
  ch, cw = int(height * cut), int(width * cut)
  cy, cx = rng.integers(0, height), rng.integers(0, width)
  top, bottom = np.clip([cy - ch // 2, cy + ch - ch // 2], 0, height)
  left, right = np.clip([cx - cw // 2, cx + cw - cw // 2], 0, width)
  return int(top), int(left), int(bottom - top), int(right - left)


def mix_pair(a, b, mixup: float, cutmix: float, rng):
  """(a', b', lam): the pair mixed, lam the weight of each row's own label."""
  use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
  lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
  if not use_cutmix:
    return lam * a + (1 - lam) * b, lam * b + (1 - lam) * a, lam
  top, left, h, w = cutmix_box(a.shape[0], a.shape[1], lam, rng)
  a2, b2 = a.copy(), b.copy()
  a2[top:top + h, left:left + w] = b[top:top + h, left:left + w]
  b2[top:top + h, left:left + w] = a[top:top + h, left:left + w]
  return a2, b2, 1.0 - h * w / (a.shape[0] * a.shape[1])


def mix_batch(batch, num_classes: int, mixup: float, cutmix: float, seed: int, b: int,
              first_row: int):
  """Mixes a process's rows of global batch b (they start at global row `first_row`, even).

  Labels become soft [rows, num_classes] float32; a pair with an unreadable row (mask 0) is
  left unmixed, so a skipped image never leaks into its neighbour.
  """
  images, labels, mask = batch['image'], batch['label'], batch['mask']
  onehot = np.eye(num_classes, dtype=np.float32)[labels]
  soft, mixed = onehot.copy(), images.copy()
  for r in range(0, len(labels) - 1, 2):
    if not (mask[r] and mask[r + 1]):
      continue
    rng = np.random.default_rng((seed, b, (first_row + r) // 2))
    mixed[r], mixed[r + 1], lam = mix_pair(images[r], images[r + 1], mixup, cutmix, rng)
    soft[r] = lam * onehot[r] + (1 - lam) * onehot[r + 1]
    soft[r + 1] = lam * onehot[r + 1] + (1 - lam) * onehot[r]
  return {**batch, 'image': mixed, 'label': soft}
