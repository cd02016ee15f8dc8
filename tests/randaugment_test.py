"""Each RandAugment op against a numpy transcription of its source, given the same draws.

'authors': randomaug.py of DUAT-Maker/Shallow-Paraformer (7aa4532), whose ops are Pillow
calls; transcribed here from Pillow's algorithms (ImageOps, ImageEnhance's blends, the C
affine transform's pixel-centre mapping). 'big_vision': big_vision/pp/autoaugment.py (TF),
transcribed from its TF ops (float32 blends truncated to uint8, tfa's projective transform
rounding to the nearest pixel). No code of randaugment.py is used below.

Where the result is not compared pixel for pixel, the reason is resampling arithmetic:
- geometric ops: a pixel whose source coordinate falls within 0.01 of a rounding boundary
  may come from the neighbouring pixel (float32 in TF, Pillow's 16.16 fixed point, our
  float64); those pixels are left out, every other one must be equal;
- sharpness and Pillow's enhance ops: the 3x3 smoothing and the blend's float rounding differ
  in summation order, so values may differ by 1 gray level.
"""
import io
import math

import numpy as np
import pytest
from PIL import Image

from paraformer_jax import randaugment
from paraformer_jax.datasets import sample_photos


@pytest.fixture(scope='module')
def photo():
  """A real photo's 48 x 64 RGB corner: edges, flat regions, a full histogram."""
  image = np.asarray(Image.open(io.BytesIO(next(sample_photos.photo_jpegs(1, seed=5)))))
  return np.ascontiguousarray(image[100:148, 100:164])


def _affine(x, matrix, fill, pixel_centre, rounding):
  """Output pixel (i, j) reads the input at matrix(point), point = (j, i) or (j + .5, i + .5);
  returns the image and the mask of pixels far from a rounding boundary."""
  a, b, c, d, e, f = matrix
  h, w = x.shape[:2]
  jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
  px, py = (jj + 0.5, ii + 0.5) if pixel_centre else (jj, ii)
  u, v = a * px + b * py + c, d * px + e * py + f
  if rounding == 'floor':  # Pillow: truncation of the coordinate (negative: outside)
    ui, vi, frac = np.floor(u), np.floor(v), lambda t: t - np.floor(t)
  else:  # TF: std::round, half away from zero
    ui, vi = np.sign(u) * np.floor(np.abs(u) + 0.5), np.sign(v) * np.floor(np.abs(v) + 0.5)
    frac = lambda t: t + 0.5 - np.floor(t + 0.5)
  safe = np.minimum(np.minimum(frac(u), 1 - frac(u)), np.minimum(frac(v), 1 - frac(v))) > 0.01
  inside = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
  out = np.empty_like(x)
  out[...] = fill
  out[inside] = x[vi[inside].astype(int), ui[inside].astype(int)]
  return out, safe


def _equal_where(ours, want, mask):
  ours = np.asarray(ours)
  assert mask.mean() > 0.85  # most pixels are compared
  np.testing.assert_array_equal(ours[mask], want[mask])


# ---- the authors' ops (Pillow's algorithms) ----

def _pil_blend(degenerate, image, factor):
  """ImagingBlend: in1 + alpha * (in2 - in1) in C float, truncated; clipped outside [0, 1]."""
  d = degenerate.astype(np.float32)
  temp = d + np.float32(factor) * (image.astype(np.float32) - d)
  return np.clip(temp, 0, 255).astype(np.uint8)


def _pil_gray(x):
  """convert('L'): ITU-R 601-2 luma in 16.16 fixed point, rounded."""
  x = x.astype(np.int64)
  return ((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16)


def _authors_want(name, x, v, rng):
  """(expected image, mask of compared pixels) for randomaug.py's op `name` at value v."""
  everywhere = np.ones(x.shape[:2], bool)
  h, w = x.shape[:2]
  if name == 'AutoContrast':
    out = np.empty_like(x)
    for c in range(3):
      nz = np.nonzero(np.bincount(x[..., c].ravel(), minlength=256))[0]
      lo, hi = nz[0], nz[-1]
      lut = np.arange(256) if hi <= lo else np.clip(
          [int(i * (255.0 / (hi - lo)) - lo * (255.0 / (hi - lo))) for i in range(256)], 0, 255)
      out[..., c] = np.asarray(lut)[x[..., c]]
    return out, everywhere
  if name == 'Equalize':
    out = np.empty_like(x)
    for c in range(3):
      histo = np.bincount(x[..., c].ravel(), minlength=256)
      nz = histo[histo > 0]
      step = (nz.sum() - nz[-1]) // 255
      lut, n = [], step // 2
      for i in range(256):
        lut.append(n // step if step else i)
        n += histo[i]
      out[..., c] = np.clip(lut, 0, 255)[x[..., c]]  # Image.point clips the table to 0..255
    return out, everywhere
  if name == 'Invert':
    return 255 - x, everywhere
  if name == 'Posterize':
    bits = max(1, int(v))
    return x & (0xFF ^ (2 ** (8 - bits) - 1)), everywhere
  if name == 'Solarize':
    return np.where(x < v, x, 255 - x), everywhere
  if name == 'SolarizeAdd':
    added = np.clip(x.astype(int) + v, 0, 255).astype(np.uint8)
    return np.where(added < 128, added, 255 - added), everywhere
  if name == 'Color':
    return _pil_blend(np.repeat(_pil_gray(x)[..., None], 3, -1), x, v), everywhere
  if name == 'Contrast':
    mean = int(_pil_gray(x).mean() + 0.5)
    return _pil_blend(np.full_like(x, mean), x, v), everywhere
  if name == 'Brightness':
    return _pil_blend(np.zeros_like(x), x, v), everywhere
  if name == 'Sharpness':
    f = x.astype(np.float32)
    smooth = x.copy()
    window = sum(f[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    smooth[1:-1, 1:-1] = np.clip((window + 4 * f[1:-1, 1:-1]) / 13 + 0.5, 0, 255)
    return _pil_blend(smooth, x, v), everywhere
  if name == 'CutoutAbs':
    # np.random.uniform(w) is uniform(low=w, high=1.0): low + (high - low) * U.
    x0 = w + (1.0 - w) * rng.random()
    y0 = h + (1.0 - h) * rng.random()
    x0, y0 = int(max(0, x0 - v / 2.)), int(max(0, y0 - v / 2.))
    x1, y1 = int(min(w, x0 + v)), int(min(h, y0 + v))
    out = x.copy()
    out[y0:y1 + 1, x0:x1 + 1] = (125, 123, 114)  # ImageDraw's rectangle includes both corners
    return out, everywhere
  sign = -1 if rng.random() > 0.5 else 1  # `if random.random() > 0.5: v = -v`
  if name == 'Rotate':
    t = -math.radians(sign * v)  # Image.rotate: counterclockwise about (w / 2, h / 2)
    cos, sin = math.cos(t), math.sin(t)
    cx, cy = w / 2, h / 2
    matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
  else:
    s = sign * v
    matrix = {'ShearX': (1, s, 0, 0, 1, 0), 'ShearY': (1, 0, 0, s, 1, 0),
              'TranslateXabs': (1, 0, s, 0, 1, 0), 'TranslateYabs': (1, 0, 0, 0, 1, s)}[name]
  return _affine(x, matrix, 0, pixel_centre=True, rounding='floor')


AUTHORS_RANGES = {  # randomaug.augment_list: (min, max)
    'AutoContrast': (0, 1), 'Equalize': (0, 1), 'Invert': (0, 1), 'Rotate': (0, 30),
    'Posterize': (0, 4), 'Solarize': (0, 256), 'SolarizeAdd': (0, 110), 'Color': (0.1, 1.9),
    'Contrast': (0.1, 1.9), 'Brightness': (0.1, 1.9), 'Sharpness': (0.1, 1.9),
    'ShearX': (0., 0.3), 'ShearY': (0., 0.3), 'TranslateXabs': (0., 100),
    'TranslateYabs': (0., 100), 'CutoutAbs': (0, 40)}
ONE_LEVEL = {'Color', 'Contrast', 'Brightness', 'Sharpness'}  # float rounding (docstring)


@pytest.mark.parametrize('name', list(AUTHORS_RANGES))
def test_each_authors_op_is_randomaug_py(name, photo):
  assert list(randaugment.AUTHORS_OPS) == list(AUTHORS_RANGES)  # their list, in their order
  lo, hi = AUTHORS_RANGES[name]
  changed = []
  for m in (5, 14, 30):
    for seed in (0, 1):  # both signs of the geometric ops, two cutout corners
      v = m / 30 * (hi - lo) + lo
      assert randaugment.authors_value(name, m) == pytest.approx(v)
      ours = np.asarray(randaugment.AUTHORS_OPS[name][0](Image.fromarray(photo), v,
                                                         np.random.default_rng(seed)))
      want, mask = _authors_want(name, photo, v, np.random.default_rng(seed))
      if name in ONE_LEVEL:
        assert np.abs(ours.astype(int) - want).max() <= 1, (m, seed)
      else:
        _equal_where(ours, want, mask)
      changed.append((ours != photo).mean())
  assert max(changed) > 0.001  # the op does something to this photo


# ---- big_vision's ops (TF's) ----

def _tf_blend(image1, image2, factor):
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  temp = image1.astype(np.float32) + np.float32(factor) * (
      image2.astype(np.float32) - image1.astype(np.float32))
  return temp.astype(np.uint8) if 0 < factor < 1 else np.clip(temp, 0, 255).astype(np.uint8)


def _tf_gray(x):
  """tf.image.rgb_to_grayscale on uint8: convert_image_dtype to float, weights, back (x 255.5)."""
  f = x.astype(np.float32) / np.float32(255)
  g = f[..., 0] * np.float32(0.2989) + f[..., 1] * np.float32(0.5870) + f[..., 2] * np.float32(
      0.1140)
  return np.clip(g * np.float32(255.5), 0, 255).astype(np.uint8)


def _big_vision_want(name, x, level, rng):
  everywhere = np.ones(x.shape[:2], bool)
  h, w = x.shape[:2]
  m = level / 10.
  if name == 'AutoContrast':
    out = x.copy()
    for c in range(3):
      lo, hi = np.float32(x[..., c].min()), np.float32(x[..., c].max())
      if hi > lo:
        scale = np.float32(255.0) / (hi - lo)
        out[..., c] = np.clip(x[..., c].astype(np.float32) * scale - lo * scale, 0,
                              255).astype(np.uint8)
    return out, everywhere
  if name == 'Equalize':
    out = x.copy()
    for c in range(3):
      histo = np.bincount(x[..., c].ravel(), minlength=256)
      nz = histo[histo != 0]
      step = (nz.sum() - nz[-1]) // 255
      if step:
        lut = np.clip(np.concatenate([[0], ((np.cumsum(histo) + step // 2) // step)[:-1]]), 0,
                      255)
        out[..., c] = lut[x[..., c]]
    return out, everywhere
  if name == 'Invert':
    return 255 - x, everywhere
  if name == 'Posterize':
    shift = min(8 - int(m * 4), 7)  # tf.bitwise shifts clamp at 7 for uint8
    return (x >> shift) << shift, everywhere
  if name == 'Solarize':
    threshold = np.uint8(int(m * 256) % 256)  # the Python int becomes a uint8 tensor: 256 -> 0
    return np.where(x < threshold, x, 255 - x), everywhere
  if name == 'SolarizeAdd':
    added = np.clip(x.astype(np.int64) + int(m * 110), 0, 255).astype(np.uint8)
    return np.where(x < 128, added, x), everywhere
  factor = m * 1.8 + 0.1
  if name == 'Color':
    return _tf_blend(np.repeat(_tf_gray(x)[..., None], 3, -1), x, factor), everywhere
  if name == 'Contrast':
    hist_sum = np.bincount(_tf_gray(x).ravel(), minlength=256).sum()  # = h * w
    return _tf_blend(np.full_like(x, int(np.float32(hist_sum) / 256)), x, factor), everywhere
  if name == 'Brightness':
    return _tf_blend(np.zeros_like(x), x, factor), everywhere
  if name == 'Sharpness':
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    f = x.astype(np.float32)
    conv = sum(kernel[i, j] * f[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    result = x.copy()
    result[1:-1, 1:-1] = np.clip(conv, 0, 255).astype(np.uint8)
    return _tf_blend(result, x, factor), everywhere
  if name == 'Cutout':
    pad = int(m * 40)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    lower, upper = max(0, cy - pad), max(0, h - cy - pad)
    left, right = max(0, cx - pad), max(0, w - cx - pad)
    out = x.copy()
    out[lower:h - upper, left:w - right] = 128
    return out, everywhere
  sign = 1 if np.floor(rng.random() + 0.5) else -1  # _randomly_negate_tensor
  if name == 'Rotate':
    t = sign * m * 30 * math.pi / 180  # tfa.image.rotate: radians, counterclockwise
    cos, sin = math.cos(t), math.sin(t)
    xo = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
    yo = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
    matrix = (cos, -sin, xo, sin, cos, yo)
  else:
    s = sign * m * {'ShearX': 0.3, 'ShearY': 0.3, 'TranslateX': 100, 'TranslateY': 100}[name]
    matrix = {'ShearX': (1, s, 0, 0, 1, 0), 'ShearY': (1, 0, 0, s, 1, 0),
              # translate(wrap(image), [-pixels, 0]): tfa's transform [1, 0, -dx, 0, 1, -dy]
              'TranslateX': (1, 0, s, 0, 1, 0), 'TranslateY': (1, 0, 0, 0, 1, s)}[name]
  return _affine(x, matrix, 128, pixel_centre=False, rounding='round')


BIG_VISION_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                  'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                  'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd']  # available_ops


@pytest.mark.parametrize('name', BIG_VISION_OPS)
def test_each_big_vision_op_is_tf_autoaugment(name, photo):
  assert list(randaugment.BIG_VISION_OPS) == BIG_VISION_OPS
  changed = []
  for level in (1, 3, 5, 10):
    for seed in (0, 1):
      ours = np.asarray(randaugment.BIG_VISION_OPS[name](Image.fromarray(photo), float(level),
                                                         np.random.default_rng(seed)))
      want, mask = _big_vision_want(name, photo, float(level), np.random.default_rng(seed))
      if name == 'Sharpness':
        assert np.abs(ours.astype(int) - want).max() <= 1, (level, seed)
      else:
        _equal_where(ours, want, mask)
      changed.append((ours != photo).mean())
  assert max(changed) > 0.001


def test_big_vision_quirks_at_its_maximum(photo):
  """What the transcription above says, on numbers: at level 10, Solarize inverts the whole
  image and Posterize keeps 4 bits."""
  op = lambda name: np.asarray(randaugment.BIG_VISION_OPS[name](
      Image.fromarray(photo), 10., np.random.default_rng(0)))
  np.testing.assert_array_equal(op('Solarize'), 255 - photo)
  np.testing.assert_array_equal(op('Posterize') & 0x0F, 0)


# ---- the op choice ----

@pytest.mark.parametrize('kind,mode,count', [('authors', 'RGB', 16), ('authors', 'L', 15),
                                             ('big_vision', 'RGB', 16)])
def test_ops_are_drawn_uniformly_with_replacement(kind, mode, count, monkeypatch):
  """random.choices(ops, k=N) (authors; no cutout for grayscale) and one uniform draw per
  layer (big_vision): N ops, each of `count` with probability 1/count, repeats allowed."""
  table = randaugment.AUTHORS_OPS if kind == 'authors' else randaugment.BIG_VISION_OPS
  drawn = []
  for name in list(table):
    if kind == 'authors':
      _, lo, hi = table[name]
      monkeypatch.setitem(table, name, (lambda img, v, rng, n=name: drawn.append(n) or img,
                                        lo, hi))
    else:
      monkeypatch.setitem(table, name, lambda img, v, rng, n=name: drawn.append(n) or img)
  img = Image.new(mode, (4, 4))
  rng = np.random.default_rng(0)
  trials = 4000
  for _ in range(trials):
    randaugment.apply(img, kind, 2, 5, rng)
  counts = {n: drawn.count(n) for n in table}
  assert len(drawn) == 2 * trials and sum(c > 0 for c in counts.values()) == count
  expect = 2 * trials / count
  assert all(abs(c - expect) < 5 * math.sqrt(expect) for c in counts.values() if c), counts
  if mode == 'L':
    assert counts['CutoutAbs'] == 0
  repeats = sum(a == b for a, b in zip(drawn[::2], drawn[1::2]))
  assert abs(repeats - trials / count) < 5 * math.sqrt(trials / count)  # with replacement


def test_bad_choices_are_refused_in_one_line():
  with pytest.raises(ValueError, match=r"randaugment='torchvision': use 'authors' .* or "
                                       r"'big_vision'"):
    randaugment.check('torchvision', 2, 10)
  with pytest.raises(ValueError, match=r'magnitude in 0\.\.10, the scale of .big_vision.'):
    randaugment.check('big_vision', 2, 14)
  with pytest.raises(ValueError, match=r'magnitude in 0\.\.30'):
    randaugment.check('authors', 2, 31)
  with pytest.raises(ValueError, match=r"takes RGB images .* this dataset has 1; use 'authors'"):
    randaugment.check('big_vision', 2, 10, channels=1)
  randaugment.check('big_vision', 0, 10, channels=1)  # off: nothing to refuse
