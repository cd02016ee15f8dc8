"""Per-example image preprocessing in numpy/PIL (run by grain workers; no TensorFlow).

Two recipes (config.data.train_crop): the authors' CIFAR one ('pad') and ImageNet's
('inception'); see `train_image`.
"""
import numpy as np
from PIL import Image

from paraformer_jax import images, randaugment


def rand_augment(image: np.ndarray, prep, rng) -> np.ndarray:
  """config.data.randaugment's ops (randaugment.py), uint8 HWC in and out."""
  img = randaugment.apply(images.to_pil(image), prep.randaugment, prep.randaugment_layers,
                          prep.randaugment_magnitude, rng)
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
      image = rand_augment(image, prep, rng)
    return image
  image = images.decode(data, prep.channels)
  if prep.randaugment_layers:
    image = rand_augment(image, prep, rng)
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
