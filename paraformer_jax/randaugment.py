"""RandAugment as the two sources our recipes follow define it (config.data.randaugment).

'authors': randomaug.py of github.com/DUAT-Maker/Shallow-Paraformer (adapted there from
  rpmcruz/autoaugment), which their CIFAR / Fashion-MNIST training inserts before the resize:
  N ops drawn with replacement from 16 (15 for grayscale: no cutout), each at the value
  m / 30 * (max - min) + min of its own range; geometric ops fill with black.
'big_vision': big_vision's randaug(N, M), which is TF's `distort_image_with_randaugment`
  (big_vision/pp/autoaugment.py, forked from tensorflow/tpu's efficientnet/autoaugment.py):
  N ops drawn with replacement from 16, levels on a 0..10 scale, geometric ops fill with 128.
  Its quirks are kept, as they shape what big_vision's ViTs were trained on: Solarize's
  threshold int(m / 10 * 256) is cast to uint8, so at M = 10 it is 0 and the image is
  inverted; Contrast blends towards (pixel count / 256), not the mean gray; Posterize to 0
  bits shifts by 7 (TF clamps the shift).

Ops take and return PIL images (the authors' are the very PIL calls of randomaug.py); the
pixel ops of 'big_vision' are numpy (its float32 arithmetic, truncating casts), its
geometric ops PIL's nearest-neighbour affine transform given TF's pixel-centre convention.
tests/randaugment_test.py compares each op with numpy transcriptions of the sources.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps


# ---- the authors' (randomaug.py) ----

def _authors_sign(v, rng):
  return -v if rng.random() > 0.5 else v  # `if random.random() > 0.5: v = -v`


def _authors_affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix)  # PIL's defaults: nearest, black


def _solarize_add_authors(img, v, rng):
  # Adds a float (0..110), truncates to uint8, then solarizes the result at 128.
  added = np.clip(np.asarray(img).astype(int) + v, 0, 255).astype(np.uint8)
  return Image.fromarray(np.where(added < 128, added, 255 - added).astype(np.uint8), img.mode)


def _cutout_abs(img, v, rng):
  w, h = img.size
  # randomaug.py draws the corner with np.random.uniform(w), i.e. uniform(low=w, high=1.0):
  # low + (high - low) * U, a value in (1, w].
  x0, y0 = w + (1.0 - w) * rng.random(), h + (1.0 - h) * rng.random()
  x0, y0 = int(max(0, x0 - v / 2.)), int(max(0, y0 - v / 2.))
  img = img.copy()
  ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), (125, 123, 114))
  return img


# name: (op(img, value, rng), min, max), in augment_list's order.
AUTHORS_OPS = {
    'AutoContrast': (lambda img, v, rng: ImageOps.autocontrast(img), 0, 1),
    'Equalize': (lambda img, v, rng: ImageOps.equalize(img), 0, 1),
    'Invert': (lambda img, v, rng: ImageOps.invert(img), 0, 1),
    'Rotate': (lambda img, v, rng: img.rotate(_authors_sign(v, rng)), 0, 30),
    'Posterize': (lambda img, v, rng: ImageOps.posterize(img, max(1, int(v))), 0, 4),
    'Solarize': (lambda img, v, rng: ImageOps.solarize(img, v), 0, 256),
    'SolarizeAdd': (_solarize_add_authors, 0, 110),
    'Color': (lambda img, v, rng: ImageEnhance.Color(img).enhance(v), 0.1, 1.9),
    'Contrast': (lambda img, v, rng: ImageEnhance.Contrast(img).enhance(v), 0.1, 1.9),
    'Brightness': (lambda img, v, rng: ImageEnhance.Brightness(img).enhance(v), 0.1, 1.9),
    'Sharpness': (lambda img, v, rng: ImageEnhance.Sharpness(img).enhance(v), 0.1, 1.9),
    'ShearX': (lambda img, v, rng: _authors_affine(img, (1, _authors_sign(v, rng), 0, 0, 1, 0)),
               0., 0.3),
    'ShearY': (lambda img, v, rng: _authors_affine(img, (1, 0, 0, _authors_sign(v, rng), 1, 0)),
               0., 0.3),
    'TranslateXabs': (lambda img, v, rng: _authors_affine(
        img, (1, 0, _authors_sign(v, rng), 0, 1, 0)), 0., 100),
    'TranslateYabs': (lambda img, v, rng: _authors_affine(
        img, (1, 0, 0, 0, 1, _authors_sign(v, rng))), 0., 100),
    'CutoutAbs': (_cutout_abs, 0, 40),  # RGB only
}
AUTHORS_MAX = 30


def authors_ops(mode: str) -> list:
  names = list(AUTHORS_OPS)
  return names if mode == 'RGB' else names[:-1]  # augment_list(for_color=False)


def authors_value(name: str, magnitude: float) -> float:
  _, lo, hi = AUTHORS_OPS[name]
  return float(magnitude) / AUTHORS_MAX * float(hi - lo) + lo


# ---- big_vision's (TF autoaugment) ----

BIG_VISION_MAX = 10.
GRAY = 128  # replace_value


def blend(image1, image2, factor: float) -> np.ndarray:
  """autoaugment.blend: float32, truncated to uint8 (clipped first when extrapolating)."""
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  image1 = np.asarray(image1, np.float32)
  temp = image1 + np.float32(factor) * (np.asarray(image2, np.float32) - image1)
  if 0.0 < factor < 1.0:
    return temp.astype(np.uint8)
  return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def rgb_to_grayscale(image: np.ndarray) -> np.ndarray:
  """tf.image.rgb_to_grayscale of uint8: to [0, 1] floats, weighted sum, x 255.5, truncated."""
  flt = image.astype(np.float32) * np.float32(1 / 255.)
  gray = flt @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  return np.clip(gray * np.float32(255.5), 0, 255).astype(np.uint8)[..., None]


# Every pixel op but Color and Sharpness maps each channel's values through a table: the
# tables are computed with TF's arithmetic on the 256 values, then applied by Image.point.
_VALUES = np.arange(256)


def _autocontrast(histograms):
  tables = []
  for h in histograms:
    nonzero = np.nonzero(h)[0]
    lo, hi = np.float32(nonzero[0]), np.float32(nonzero[-1])
    if hi > lo:
      scale = np.float32(255.0) / (hi - lo)
      tables.append(np.clip(_VALUES.astype(np.float32) * scale + (-lo * scale), 0.0, 255.0))
    else:
      tables.append(_VALUES)
  return tables


def _equalize(histograms):
  tables = []
  for histo in histograms:
    nonzero = histo[histo != 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      tables.append(_VALUES)
    else:
      lut = (np.cumsum(histo) + step // 2) // step
      tables.append(np.clip(np.concatenate([[0], lut[:-1]]), 0, 255))
  return tables


def _contrast(histograms, factor):
  # TF's degenerate image is sum(histogram) / 256, i.e. the pixel count over 256.
  mean = np.float32(histograms[0].sum()) / np.float32(256.0)
  return blend(np.full(256, np.uint8(np.clip(mean, 0.0, 255.0))), _VALUES, factor)


def _table_op(fn):
  """An op whose fn(histograms [C, 256], m) gives a table per channel (or one for all)."""

  def op(img, level, rng):
    h = np.asarray(img.histogram()).reshape(-1, 256)
    tables = np.broadcast_to(np.asarray(fn(h, level / BIG_VISION_MAX)), (len(h), 256))
    return img.point(tables.astype(np.uint8).ravel().tolist())
  return op


def _pil_blend(degenerate, img, factor):
  """`blend` as Pillow's C computes it: the same float32 arithmetic and truncation."""
  return Image.blend(degenerate, img, factor)


def _sharpness(img, level, rng):
  x = np.asarray(img)
  h, w = x.shape[:2]
  i = x.astype(np.uint16)
  # The 3x3 SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 over the interior ('VALID'),
  # summed exactly in integers (TF's float32 sum may land 1 below an integer quotient).
  window = 4 * i[1:-1, 1:-1]
  for a in range(3):
    for b in range(3):
      window += i[a:h - 2 + a, b:w - 2 + b]
  degenerate = x.copy()
  degenerate[1:-1, 1:-1] = window // 13
  return _pil_blend(Image.fromarray(degenerate), img, level / BIG_VISION_MAX * 1.8 + 0.1)


def _color(img, level, rng):
  gray = Image.fromarray(np.repeat(rgb_to_grayscale(np.asarray(img)), 3, -1))
  return _pil_blend(gray, img, level / BIG_VISION_MAX * 1.8 + 0.1)


def _tf_affine(img, a, b, c, d, e, f):
  """TF's projective transform (output pixel (x, y) reads input (ax + by + c, dx + ey + f),
  rounded to the nearest pixel, 128 outside) as PIL's affine transform, which maps pixel
  centres (x + 0.5, y + 0.5) and truncates: the same mapping shifted by half a pixel."""
  matrix = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
  return img.transform(img.size, Image.AFFINE, matrix, fillcolor=(GRAY,) * len(img.getbands()))


def _rotate(img, degrees):
  theta = degrees * math.pi / 180.0
  cos, sin = math.cos(theta), math.sin(theta)
  w, h = img.size
  x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return _tf_affine(img, cos, -sin, x_offset, sin, cos, y_offset)


def _cutout(x, pad_size, rng):
  h, w = x.shape[:2]
  cy, cx = rng.integers(0, h), rng.integers(0, w)
  x = x.copy()
  x[max(0, cy - pad_size):min(h, cy + pad_size), max(0, cx - pad_size):min(w, cx + pad_size)] = GRAY
  return x


def _posterize(bits):
  shift = min(8 - bits, 7)  # TF's bitwise shifts clamp to the type's width - 1
  return (_VALUES >> shift) << shift


def _solarize(threshold):
  return np.where(_VALUES < np.uint8(threshold % 256), _VALUES, 255 - _VALUES)  # as uint8


def _solarize_add(addition):
  return np.where(_VALUES < 128, np.clip(_VALUES + addition, 0, 255), _VALUES)


def _negate(v, rng):
  return v if rng.random() >= 0.5 else -v  # _randomly_negate_tensor: floor(U + 0.5)


def _numpy_op(fn):
  return lambda img, level, rng: Image.fromarray(fn(np.asarray(img), level / BIG_VISION_MAX, rng))


# name: op(img, level, rng), in distort_image_with_randaugment's available_ops order.
BIG_VISION_OPS = {
    'AutoContrast': _table_op(lambda h, m: _autocontrast(h)),
    'Equalize': _table_op(lambda h, m: _equalize(h)),
    'Invert': _table_op(lambda h, m: 255 - _VALUES),
    'Rotate': lambda img, level, rng: _rotate(img, _negate(level / BIG_VISION_MAX * 30., rng)),
    'Posterize': _table_op(lambda h, m: _posterize(int(m * 4))),
    'Solarize': _table_op(lambda h, m: _solarize(int(m * 256))),
    'Color': _color,
    'Contrast': _table_op(lambda h, m: _contrast(h, m * 1.8 + 0.1)),
    'Brightness': _table_op(lambda h, m: blend(np.zeros(256), _VALUES, m * 1.8 + 0.1)),
    'Sharpness': _sharpness,
    'ShearX': lambda img, level, rng: _tf_affine(
        img, 1., _negate(level / BIG_VISION_MAX * 0.3, rng), 0., 0., 1., 0.),
    'ShearY': lambda img, level, rng: _tf_affine(
        img, 1., 0., 0., _negate(level / BIG_VISION_MAX * 0.3, rng), 1., 0.),
    'TranslateX': lambda img, level, rng: _tf_affine(
        img, 1., 0., _negate(level / BIG_VISION_MAX * 100., rng), 0., 1., 0.),
    'TranslateY': lambda img, level, rng: _tf_affine(
        img, 1., 0., 0., 0., 1., _negate(level / BIG_VISION_MAX * 100., rng)),
    'Cutout': _numpy_op(lambda x, m, rng: _cutout(x, int(m * 40), rng)),
    'SolarizeAdd': _table_op(lambda h, m: _solarize_add(int(m * 110))),
}


# ---- the choice ----

MAX_MAGNITUDE = {'authors': AUTHORS_MAX, 'big_vision': BIG_VISION_MAX}


def check(kind: str, layers: int, magnitude: float, channels: int | None = None):
  """One-line refusals of a RandAugment the sources do not define."""
  if kind not in MAX_MAGNITUDE:
    raise ValueError(f"config.data.randaugment={kind!r}: use 'authors' (their randomaug.py, "
                     f"magnitudes 0..30) or 'big_vision' (TF autoaugment's randaug, 0..10).")
  if layers < 0 or not 0 <= magnitude <= MAX_MAGNITUDE[kind]:
    raise ValueError(f'config.data.randaugment_layers={layers}, randaugment_magnitude='
                     f'{magnitude}: use layers >= 0 (0: off) and a magnitude in '
                     f'0..{MAX_MAGNITUDE[kind]:g}, the scale of {kind!r}.')
  if kind == 'big_vision' and layers and channels not in (None, 3):
    raise ValueError(f"config.data.randaugment='big_vision' takes RGB images (TF's ops work "
                     f"on 3 channels) and this dataset has {channels}; use 'authors', whose "
                     f"ops take grayscale too.")


def apply(img: Image.Image, kind: str, layers: int, magnitude: float, rng) -> Image.Image:
  """`layers` ops drawn uniformly with replacement, then applied in order."""
  if kind == 'authors':
    names = authors_ops(img.mode)
    for name in [names[i] for i in rng.integers(0, len(names), size=layers)]:
      img = AUTHORS_OPS[name][0](img, authors_value(name, magnitude), rng)
    return img
  names = list(BIG_VISION_OPS)
  for i in rng.integers(0, len(names), size=layers):
    img = BIG_VISION_OPS[names[i]](img, float(magnitude), rng)
  return img
