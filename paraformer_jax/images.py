"""Decoding and cropping of stored images, and the ImageNet crops (big_vision's, DeiT's).

Datasets whose TFDS feature is an encoded `Image` (ImageNet's JPEGs, CIFAR's PNGs) reach us
as bytes (`tfds.decode.SkipDecoding`), so we choose how to decode. For a crop that is then
shrunk to the output size, PIL's `draft` makes libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT
scaling) whenever the crop still has at least the output's pixels at that scale: the decode,
most of an example's cost, shrinks with it. Grayscale and CMYK files are converted to the
dataset's channels; a file that does not decode raises `CorruptImage`.
"""
import io
import math

import numpy as np
from PIL import Image

DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes directly


class CorruptImage(ValueError):
  """An example's image bytes do not decode."""


def open_image(data) -> Image.Image:
  """A PIL image of encoded bytes (header read, pixels not yet decoded) or of an array."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
  try:
    return Image.open(io.BytesIO(bytes(data)))
  except (OSError, ValueError, SyntaxError) as e:
    raise CorruptImage(str(e)) from e


def to_array(img: Image.Image, channels: int) -> np.ndarray:
  """uint8 HWC with `channels` channels; decodes (and converts gray / CMYK) if still needed."""
  mode = 'L' if channels == 1 else 'RGB'
  try:
    if img.mode != mode:
      img = img.convert(mode)
    out = np.asarray(img, np.uint8)
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise CorruptImage(str(e)) from e
  return out[..., None] if channels == 1 else out


def decode(data, channels: int) -> np.ndarray:
  """The whole image, uint8 HWC."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return data
  return to_array(open_image(data), channels)


def inception_box(width: int, height: int, scale, ratio, rng):
  """A random crop (left, top, w, h) as in Inception / torchvision's RandomResizedCrop.

  Area a uniform fraction in `scale` of the image, aspect ratio w/h log-uniform in `ratio`;
  ten tries, then the central crop with the ratio clamped into range.
  """
  area = width * height
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def center_box(width: int, height: int, fraction: float):
  """The central square of side `fraction` x the shorter side (left, top, w, h).

  Cropped and resized to S, it equals resizing the shorter side to S / fraction and taking
  the central S x S (big_vision's resize_small(256) | central_crop(224) for fraction 0.875).
  """
  side = fraction * min(width, height)
  return (width - side) / 2, (height - side) / 2, side, side


def crop_resize(img: Image.Image, box, size: int, channels: int) -> np.ndarray:
  """img[box] resized (bilinear, antialiased) to size x size, decoding at reduced scale
  where the crop allows; uint8 HWC."""
  left, top, w, h = box
  width, height = img.size
  if img.format == 'JPEG':
    k = next(k for k in DCT_SCALES if min(w, h) / k >= size or k == 1)
    if k > 1:
      img.draft(img.mode, (width // k, height // k))
  sx, sy = img.size[0] / width, img.size[1] / height
  try:
    if img.mode not in ('L', 'RGB'):  # CMYK, palette, 16-bit: resize in the output's mode
      img = img.convert('L' if channels == 1 else 'RGB')
    img = img.resize((size, size), Image.BILINEAR,
                     box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise CorruptImage(str(e)) from e
  return to_array(img, channels)
