"""Frames: which frames of a clip are read, and their train/test transforms (docs/data.md, "Frames").

Frames stay uint8 from the decoder to the batch: decoded by PIL, cropped, resized and flipped by torchvision, handed
over as uint8 tensors; the visual encoder normalises the batch on its device (common/models.py). The previous path
(--legacy-loader: float frames normalised here, in the loader) is kept for comparison.
"""

import os
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common.models import IMAGENET_MEAN, IMAGENET_STD


def select_frames(n, t_f, train, mode="segment", generator=None):
    """Indices into a sorted list of n frames (docs/data.md).

    segment: split [0, n) into t_f equal segments; a random index per segment when training, the middle at test.
    first:   the first t_f frames (parity with the originals' unsorted listing, made reproducible).
    """
    if n < t_f:
        raise ValueError(f"clip has {n} frames, fewer than the {t_f} asked")
    if mode == "first":
        return list(range(t_f))
    idx = []
    for j in range(t_f):
        lo, hi = (j * n) // t_f, ((j + 1) * n) // t_f
        if train:
            idx.append(lo + int(torch.randint(0, hi - lo, (1,), generator=generator)))
        else:
            idx.append(lo + (hi - lo) // 2)
    return idx


@dataclass(frozen=True)
class FrameConfig:
    n_frames: int = 1
    size: int = 224
    select: str = "segment"  # segment | first
    clip_consistent: bool = False  # one crop/flip draw per clip instead of per frame
    crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop scale (T-PAMI preset: (0.25, 1.0))
    test_resize: str = "square"  # square: Resize((s, s)); center: Resize(s) + CenterCrop(s) (T-PAMI preset)
    legacy: bool = False  # --legacy-loader: PIL images in, float32 ImageNet-normalised frames out


class FrameTransform:
    """Train: RandomResizedCrop + flip (per frame or per clip); test: deterministic resize (torchvision, on PIL
    images: bilinear, antialiased). Returns uint8 (3, T_f, size, size), normalised later by the visual encoder on
    its device; with `cfg.legacy`, float32 frames ImageNet-normalised here (the previous loader: the same values
    after normalisation, bitwise)."""

    def __init__(self, cfg: FrameConfig):
        self.cfg = cfg
        self.norm = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.rrc = T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale)
        self.train_tf = T.Compose([self.rrc, T.RandomHorizontalFlip(0.5)])
        if cfg.test_resize == "square":
            self.test_tf = T.Resize((cfg.size, cfg.size))
        else:
            self.test_tf = T.Compose([T.Resize(cfg.size), T.CenterCrop(cfg.size)])

    def __call__(self, images, train):
        if not train:
            out = [self.test_tf(im) for im in images]
        elif self.cfg.clip_consistent:
            i, j, h, w = T.RandomResizedCrop.get_params(images[0], self.rrc.scale, self.rrc.ratio)
            flip = bool(torch.rand(1) < 0.5)
            out = [TF.resized_crop(im, i, j, h, w, [self.cfg.size, self.cfg.size]) for im in images]
            out = [TF.hflip(im) for im in out] if flip else out
        else:
            out = [self.train_tf(im) for im in images]
        to_tensor = self.norm if self.cfg.legacy else TF.pil_to_tensor  # float32 normalised | uint8 as it is
        return torch.stack([to_tensor(im) for im in out]).permute(1, 0, 2, 3)  # (3, T_f, H, W)


def load_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path}: unreadable image ({e}); re-extract this clip's frames or remove it from the split"
        ) from e


# start and end markers of the frame files list_frames accepts; the end marker is looked for in the file's last
# TAIL bytes (writers end a JPEG at its EOI marker, a few pad bytes after it are tolerated)
_MARKERS = {".jpg": (b"\xff\xd8", b"\xff\xd9"), ".jpeg": (b"\xff\xd8", b"\xff\xd9"),
            ".png": (b"\x89PNG\r\n\x1a\n", b"IEND")}
TAIL = 1024


def check_image(path):
    """Start-up check of a frame file, without decoding it: None if it looks whole, else the reason to skip its
    clip: "empty frame file" (zero bytes), "corrupt frame" (no JPEG SOI / PNG signature at the start, or
    unreadable) or "truncated frame" (no JPEG EOI / PNG IEND marker near the end)."""
    start, end = _MARKERS[os.path.splitext(path)[1].lower()]
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, len(start), 0)
            tail = os.pread(fd, TAIL, max(len(start), size - TAIL))
        finally:
            os.close(fd)
    except OSError:
        return "corrupt frame"
    if size == 0:
        return "empty frame file"
    if head != start:
        return "corrupt frame"
    return None if end in tail else "truncated frame"


def list_frames(frame_dir):
    if not os.path.isdir(frame_dir):
        return []
    return sorted(f for f in os.listdir(frame_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
