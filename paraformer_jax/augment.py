"""Per-example image preprocessing in numpy/PIL (run by grain workers; no TensorFlow).

Two recipes (config.data.train_crop): the authors' CIFAR one ('pad') and ImageNet's
('inception'); see `train_image`.
"""
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from paraformer_jax import images

MAX_MAGNITUDE = 30  # RandAugment magnitudes are on a 0..30 scale, as in the authors' code


def _gray(img):
  """Mid-gray in the image's mode: Pillow reads a bare 128 on an RGB image as (128, 0, 0)."""
  return (128,) * len(img.getbands())


def _affine(img, matrix):
  # Nearest neighbour, like rotate and like the references' RandAugments (torchvision's,
  # TF's used by big_vision, PIL ones): bilinear cost 13x more at 224 px.
  return img.transform(img.size, Image.AFFINE, matrix, fillcolor=_gray(img))


def _signed(v, rng):
  return v if rng.random() < 0.5 else -v


# Each op: (PIL image, strength in [0, 1], rng) -> PIL image.
RAND_AUGMENT_OPS = {
    'identity': lambda img, s, rng: img,
    'autocontrast': lambda img, s, rng: ImageOps.autocontrast(img),
    'equalize': lambda img, s, rng: ImageOps.equalize(img),
    'rotate': lambda img, s, rng: img.rotate(_signed(30 * s, rng), fillcolor=_gray(img)),
    'solarize': lambda img, s, rng: ImageOps.solarize(img, int(256 - 256 * s)),
    'posterize': lambda img, s, rng: ImageOps.posterize(img, max(1, int(8 - 4 * s))),
    'contrast': lambda img, s, rng: ImageEnhance.Contrast(img).enhance(1 + _signed(0.9 * s, rng)),
    'brightness': lambda img, s, rng: ImageEnhance.Brightness(img).enhance(
        1 + _signed(0.9 * s, rng)),
    'sharpness': lambda img, s, rng: ImageEnhance.Sharpness(img).enhance(
        1 + _signed(0.9 * s, rng)),
    'color': lambda img, s, rng: ImageEnhance.Color(img).enhance(1 + _signed(0.9 * s, rng)),
    'shear_x': lambda img, s, rng: _affine(img, (1, _signed(0.3 * s, rng), 0, 0, 1, 0)),
    'shear_y': lambda img, s, rng: _affine(img, (1, 0, 0, _signed(0.3 * s, rng), 1, 0)),
    'translate_x': lambda img, s, rng: _affine(
        img, (1, 0, _signed(0.45 * s * img.size[0], rng), 0, 1, 0)),
    'translate_y': lambda img, s, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(0.45 * s * img.size[1], rng))),
}


def _rand_augment(img: Image.Image, layers: int, magnitude: int, rng) -> Image.Image:
  for name in rng.choice(list(RAND_AUGMENT_OPS), size=layers):
    img = RAND_AUGMENT_OPS[name](img, magnitude / MAX_MAGNITUDE, rng)
  return img


def rand_augment(image: np.ndarray, layers: int, magnitude: int, rng) -> np.ndarray:
  """`layers` ops drawn uniformly, each at strength magnitude / 30; uint8 HWC in and out."""
  img = _rand_augment(images.to_pil(image), layers, magnitude, rng)
  return np.asarray(img, np.uint8).reshape(image.shape)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[:2] == (size, size):
    return image
  return images.to_array(images.to_pil(image).resize((size, size), Image.BILINEAR),
                         image.shape[-1])


def random_crop(image: np.ndarray, padding: int, rng) -> np.ndarray:
  """Zero-pad by `padding` and crop back to the original size at a random offset."""
  if padding <= 0:
    return image
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top:top + h, left:left + w]


def normalize(image: np.ndarray, mean: float, std: float) -> np.ndarray:
  return ((image.astype(np.float32) / 255.0) - mean) / std


def train_image(data, prep, rng) -> np.ndarray:
  """Encoded bytes or uint8 HWC -> augmented uint8 [size, size, C] (normalized later, on
  device: input_pipeline.finish).

  'inception' (ImageNet, big_vision / DeiT order): random-resized crop (bilinear, not
  antialiased, as big_vision's), flip, RandAugment on the output-size image. 'pad' (the
  authors' CIFAR recipe): RandAugment on the stored image, resize, zero-padded random crop,
  flip.
  """
  if prep.train_crop == 'inception':
    box = images.inception_box(*images.image_size(data), prep.crop_scale, prep.crop_ratio, rng)
    image = images.crop_resize_bilinear(data, box, prep.image_size, prep.channels)
    if prep.flip and rng.random() < 0.5:
      image = images.flip_left_right(image)
    if prep.randaugment_layers:
      image = rand_augment(image, prep.randaugment_layers, prep.randaugment_magnitude, rng)
    return image
  image = images.decode(data, prep.channels)
  if prep.randaugment_layers:
    image = rand_augment(image, prep.randaugment_layers, prep.randaugment_magnitude, rng)
  image = random_crop(resize(image, prep.image_size), prep.crop_padding, rng)
  return image[:, ::-1] if prep.flip and rng.random() < 0.5 else image


def eval_image(data, prep) -> np.ndarray:
  """Encoded bytes or uint8 HWC -> uint8 [size, size, C]: the central crop of
  `eval_crop_fraction` of the shorter side ('center'), or the whole image squashed ('resize')."""
  if prep.eval_crop == 'center':
    box = images.center_box(*images.image_size(data), prep.eval_crop_fraction)
    return images.to_array(images.crop_resize(data, box, prep.image_size, prep.channels),
                           prep.channels)
  return resize(images.decode(data, prep.channels), prep.image_size)
