"""Image data for MatViT: scikit-learn's 8x8 digits, a user's image folder, light augmentation.

An :class:`ImageDataset` holds float images in ``[0, 1]``, shape ``(N, C, H, W)``, with integer
labels, already split into a training part (the retrieval gallery) and a held-out part (the
test set and the retrieval queries). The split is stratified and deterministic: it depends
only on the data and ``split_seed``, never on the training seed, so evaluation and retrieval
see the same held-out images that training never did.

Image folders follow the usual layout, one sub-folder per class::

    photos/cat/001.jpg  photos/cat/002.png  photos/dog/a.jpeg ...

Handling of bad input (documented, tested):

- every image is converted to the requested channels (``L`` or ``RGB``) and **resized** to
  ``image_size x image_size`` (bilinear; non-square images are stretched), so mixed sizes and
  modes are accepted;
- files whose extension is not an image extension (:data:`IMAGE_EXTENSIONS`) are ignored;
- a file with an image extension that Pillow cannot read, or one so large that Pillow refuses to
  decode it (a decompression bomb: more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels),
  raises a ValueError naming the file, unless ``skip_unreadable=True`` (then it is skipped with a
  warning, and the count is logged);
- a class folder with no images raises a ValueError naming it (an empty class would make the
  labels and the classifier disagree about the number of classes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

#: Embedded data sets (no download): scikit-learn ships the digits.
EMBEDDED = ("digits",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


@dataclass(frozen=True)
class ImageDataset:
    """Images in ``[0, 1]`` (N, C, H, W) and int64 labels, split into train and held-out parts.

    Attributes:
        train_x / train_y: Training images and labels (also the retrieval gallery).
        val_x / val_y: Held-out images and labels (test set, retrieval queries).
        classes: Class names, index = label.
        name: The data spec it came from.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    classes: tuple[str, ...]
    name: str = "images"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}: {len(self.train_y)} train / {len(self.val_y)} "
                f"held-out images of shape {self.image_shape}, {self.num_classes} classes)")


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Indices (train, val): ``round(val_fraction * n_c)`` of every class held out, chosen by a
    permutation seeded with ``seed``; a class of one image stays in train."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(round(val_fraction * len(idx)), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _fit(images: Tensor, image_size: int, channels: int) -> Tensor:
    """Resize (bilinear) and convert channels (1 <-> 3) of (N, C, H, W) images in [0, 1]."""
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels}")
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True).clamp(0, 1)
    return images.contiguous()


def _split(name: str, x: Tensor, y: Tensor, classes: tuple[str, ...], val_fraction: float,
           split_seed: int) -> ImageDataset:
    tr, va = stratified_split(y, val_fraction, split_seed)
    return ImageDataset(x[tr], y[tr], x[va], y[va], classes, name)


def load_digits_dataset(image_size: int = 8, channels: int = 1, val_fraction: float = 0.2,
                        split_seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as e:  # pragma: no cover - a dependency of the package
        raise ModuleNotFoundError("the digits need scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    return _split("digits", _fit(x, image_size, channels), y,
                  tuple(str(n) for n in d.target_names), val_fraction, split_seed)


#: Single-channel modes with more than 8 bits per pixel: Pillow's ``convert("L")`` clips them
#: (a 16-bit PNG became all 255), so they are scaled by their own range instead.
WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
              "I": 65535.0, "F": 1.0}


def _wide_gray(im: Any, path: Path, image_size: int) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image as (H, W) values in [0, 1]."""
    from PIL import Image

    scale = WIDE_MODES[im.mode]
    arr = np.asarray(im, dtype=np.float32) / scale
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        what = "floats" if im.mode == "F" else f"{im.mode} values"
        raise ValueError(f"its {what} span {arr.min() * scale:g}.."
                         f"{arr.max() * scale:g}, outside 0..{scale:g} (scale the image to "
                         "that range, or save it as 8-bit)")
    small = Image.fromarray(arr).resize((image_size, image_size),
                                                  Image.Resampling.BILINEAR)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in WIDE_MODES:
                gray = _wide_gray(im, path, image_size)
                return gray[None] if channels == 1 else np.repeat(gray[None], 3, axis=0)
            im = im.convert("L" if channels == 1 else "RGB")
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except Image.DecompressionBombError as e:  # a huge (or hostile) image: never decoded
        raise ValueError(f"cannot read image {path}: it is too large to decode safely ({e})"
                         ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(root: str | Path, image_size: int, channels: int = 3,
                      val_fraction: float = 0.2, split_seed: int = 0,
                      skip_unreadable: bool = False) -> ImageDataset:
    """Images from ``root/<class>/<file>`` (Pillow), resized to ``image_size`` square.

    Class names are the sub-folder names in sorted order (label = index). See the module
    docstring for how unreadable files, empty class folders and mixed sizes are handled.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: choose 1 (grayscale) or 3 (RGB)")
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive integer")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a "
                                f"directory (or use an embedded data set: {EMBEDDED})")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise ValueError(f"image folder {str(root)!r} needs at least 2 class sub-folders "
                         f"(root/<class>/<image>), found {len(class_dirs)}")
    files = {d: sorted(f for f in d.rglob("*") if f.is_file()
                       and f.suffix.lower() in IMAGE_EXTENSIONS) for d in class_dirs}
    empty = [d.name for d, fs in files.items() if not fs]
    if empty:
        raise ValueError(f"class folder(s) {empty} in {str(root)!r} hold no images (allowed "
                         f"extensions: {', '.join(IMAGE_EXTENSIONS)}); add images or remove "
                         "the folder")
    images, labels, skipped = [], [], []
    for label, d in enumerate(class_dirs):
        for f in files[d]:
            try:
                images.append(_read_image(f, image_size, channels))
            except ValueError as e:
                if not skip_unreadable:
                    raise ValueError(f"{e} (pass skip_unreadable=True to "
                                     "skip such files)") from e
                log.warning("skipping %s", e)
                skipped.append(f)
                continue
            labels.append(label)
    lost = sorted({d.name for d in class_dirs} - {class_dirs[i].name for i in set(labels)})
    if lost:
        raise ValueError(f"class folder(s) {lost} in {str(root)!r} hold no readable images")
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s", len(skipped), root)
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor(labels, dtype=torch.long)
    return _split(str(root), x, y, tuple(d.name for d in class_dirs), val_fraction, split_seed)


def load_images(spec: str, image_size: int, channels: int, val_fraction: float = 0.2,
                split_seed: int = 0, skip_unreadable: bool = False) -> ImageDataset:
    """An embedded data set by name (``digits``) or an image folder by path."""
    if spec == "digits":
        return load_digits_dataset(image_size, channels, val_fraction, split_seed)
    return load_image_folder(spec, image_size, channels, val_fraction, split_seed,
                             skip_unreadable)


def random_shift(images: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y (edge pixels replicated).

    The light augmentation used in training: a handwritten digit or a photo shifted by a pixel
    or two is the same class. Shifts come from ``gen``, so a batch is reproducible.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    s = max_shift
    shifts = torch.randint(-s, s + 1, (n, 2), generator=gen)
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    out = torch.empty_like(images)
    for dy, dx in torch.unique(shifts, dim=0).tolist():
        sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        out[sel] = padded[sel, :, s + dy: s + dy + h, s + dx: s + dx + w]
    return out
