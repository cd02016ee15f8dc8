"""Decoding and cropping of stored images, and the ImageNet crops (big_vision's, DeiT's).

Datasets whose TFDS feature is an encoded `Image` (ImageNet's JPEGs, CIFAR's PNGs) reach us
as bytes (`tfds.decode.SkipDecoding`), so we choose how to decode. JPEGs go through
simplejpeg (libjpeg-turbo), 2-3x faster than PIL's decoder on the same files
(benchmarks/input_pipeline.py); other formats, and the JPEGs libjpeg-turbo cannot convert to
RGB (CMYK), through PIL. For a crop that is then shrunk to the output size, libjpeg decodes
at 1/2, 1/4 or 1/8 scale (DCT scaling) whenever the crop keeps at least the output's pixels
at that scale: the decode, most of an example's cost, shrinks with it. Grayscale and CMYK
files are converted to the dataset's channels; a file that does not decode raises
`CorruptImage`.

Two resizes: the training crop is bilinear without antialiasing, as big_vision's
`inception_crop` (tf.image.resize, antialias=False), through OpenCV: 0.11 ms a crop against
PIL's antialiased 0.60 ms (docs/input_pipeline.md). Evaluation keeps PIL's antialiased
bilinear, close to big_vision's area-method `resize_small`; OpenCV's area resize was slower.
"""
import io
import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image

# A grain worker process is one core's worth of work; OpenCV's own thread pool would
# oversubscribe the cores the other workers use.
cv2.setNumThreads(1)

DCT_SCALES = (8, 4, 2, 1)  # reductions libjpeg-turbo decodes faster than full size
JPEG_MAGIC = b'\xff\xd8\xff'
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


class CorruptImage(ValueError):
  """An example's image bytes do not decode."""


def _is_array(data) -> bool:
  return isinstance(data, np.ndarray) and data.dtype != object


def image_size(data) -> tuple[int, int]:
  """(width, height), from the header alone for encoded bytes."""
  if _is_array(data):
    return data.shape[1], data.shape[0]
  data = bytes(data)
  try:
    if data[:3] == JPEG_MAGIC:
      height, width, _, _ = simplejpeg.decode_jpeg_header(data)
      return width, height
    return Image.open(io.BytesIO(data)).size
  except DECODE_ERRORS as e:
    raise CorruptImage(str(e)) from e


def _pil_decode(data: bytes, channels: int) -> np.ndarray:
  try:
    img = Image.open(io.BytesIO(data))
    mode = 'L' if channels == 1 else 'RGB'
    return np.asarray(img if img.mode == mode else img.convert(mode), np.uint8)
  except DECODE_ERRORS as e:
    raise CorruptImage(str(e)) from e


def decode(data, channels: int, min_width: int = 0, min_height: int = 0) -> np.ndarray:
  """uint8 HWC with `channels` channels; JPEGs at the smallest DCT scale that keeps at least
  min_width x min_height (0: full size). Arrays pass through."""
  if _is_array(data):
    return data
  data = bytes(data)
  out = None
  if data[:3] == JPEG_MAGIC:
    try:
      out = simplejpeg.decode_jpeg(data, 'GRAY' if channels == 1 else 'RGB',
                                   min_width=min_width, min_height=min_height)
    except ValueError:  # CMYK, or damaged: PIL converts the one and rejects the other
      pass
  if out is None:
    out = _pil_decode(data, channels)
  return out.reshape(out.shape[:2] + (channels,))


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


def to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def to_array(img: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(img, np.uint8)
  return out.reshape(out.shape[:2] + (channels,))


def _decode_for_crop(data, box, size: int, channels: int):
  """(image, box in its pixels): decoded at the smallest DCT scale that keeps the crop at
  least `size` on its shorter side."""
  left, top, w, h = box
  width, height = image_size(data)
  # Only 1/2, 1/4, 1/8: libjpeg-turbo's other M/8 scales decode slower than full size.
  k = next(k for k in DCT_SCALES if min(w, h) / k >= size or k == 1)
  image = decode(data, channels, math.ceil(width / k) if k > 1 else 0,
                 math.ceil(height / k) if k > 1 else 0)
  sx, sy = image.shape[1] / width, image.shape[0] / height
  return image, (left * sx, top * sy, w * sx, h * sy)


def crop_resize(data, box, size: int, channels: int) -> Image.Image:
  """image[box] resized (bilinear, antialiased) to size x size, as a PIL image (evaluation).
  Decodes at a reduced scale where the crop allows."""
  image, (left, top, w, h) = _decode_for_crop(data, box, size, channels)
  return to_pil(image).resize((size, size), Image.BILINEAR,
                              box=(left, top, left + w, top + h))


def flip_left_right(image: np.ndarray) -> np.ndarray:
  """A contiguous mirrored copy: OpenCV's flip costs a seventh of numpy's strided copy."""
  return cv2.flip(image, 1).reshape(image.shape)


def crop_resize_bilinear(data, box, size: int, channels: int) -> np.ndarray:
  """image[box] resized to size x size, bilinear without antialiasing (big_vision's training
  crop), uint8 HWC. Decodes at a reduced scale where the crop allows; there the box is
  rounded to whole pixels of the reduced image."""
  image, (left, top, w, h) = _decode_for_crop(data, box, size, channels)
  left, top = round(left), round(top)
  crop = image[top:top + max(round(h), 1), left:left + max(round(w), 1)]
  out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
  return out.reshape(size, size, channels)
