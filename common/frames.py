"""Frames: which frames of a clip are read, and their train/test transforms (docs/data.md, "Frames").

Frames stay uint8 from the decoder to the batch: decoded by simplejpeg (JPEG) or OpenCV (PNG) into an (H, W, 3)
array (PIL's pixels), cropped by slicing, resized by torch's uint8 antialiased bilinear kernel (channels-last, the
fast path) and flipped as uint8 tensors; the visual encoder normalises the batch on its device (common/models.py).
The draws (crop box, flip) are torchvision's RandomResizedCrop / RandomHorizontalFlip draws, in the same order; the
pixels are within 2 levels of torchvision's PIL resize (docs/data.md). The previous path (--legacy-loader: PIL
crops and resizes, float frames normalised here, in the loader) is kept for comparison.
"""

import os
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def resize_uint8(x, size):
    """(3, h, w) uint8 -> (3, size[0], size[1]) uint8, bilinear and antialiased like torchvision's Resize on a PIL
    image (within 2 levels; docs/data.md): torch's uint8 kernel, which is fast on channels-last input."""
    x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=[int(size[0]), int(size[1])], mode="bilinear", antialias=True, align_corners=False)[0]


def resize_short_side(x, size):
    """torchvision's Resize(size) on a (3, h, w) uint8 tensor: the short side to `size`, the long side
    int(size * long / short)."""
    h, w = x.shape[-2:]
    if h <= w:
        return resize_uint8(x, (size, int(size * w / h)))
    return resize_uint8(x, (int(size * h / w), size))


class FrameTransform:
    """Train: RandomResizedCrop + flip (per frame or per clip); test: deterministic resize. Returns uint8
    (3, T_f, size, size), normalised later by the visual encoder on its device.

    `frames` are (H, W, 3) uint8 RGB arrays (load_frame, or the cache's rows). The crop box and flip come from
    torchvision's own draws, in the order its Compose([RandomResizedCrop, RandomHorizontalFlip]) makes them; the
    resize is resize_uint8. With `cfg.legacy` (the previous loader) `frames` are PIL images, cropped and resized by
    torchvision on PIL, and the output is float32 ImageNet-normalised here."""

    def __init__(self, cfg: FrameConfig):
        import torchvision.transforms as T  # here, not at the top: torchvision imports torch._dynamo (about 1 s)

        self.cfg = cfg
        self.norm = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.rrc = T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale)
        self.train_tf = T.Compose([self.rrc, T.RandomHorizontalFlip(0.5)])
        if cfg.test_resize == "square":
            self.test_tf = T.Resize((cfg.size, cfg.size))
        else:
            self.test_tf = T.Compose([T.Resize(cfg.size), T.CenterCrop(cfg.size)])

    def __call__(self, frames, train):
        import torchvision.transforms.functional as TF  # loaded by __init__ already: a lookup

        if self.cfg.legacy:
            return self.legacy(frames, train)
        s = self.cfg.size
        out = np.empty((3, len(frames), s, s), np.uint8)  # planar: the layout the model reads
        flip, box = False, None
        for k, f in enumerate(frames):
            x = torch.from_numpy(f).permute(2, 0, 1)  # (3, H, W) view of the (H, W, 3) array
            if not train and self.cfg.test_resize == "square":
                y = resize_uint8(x, (s, s))
            elif not train:  # Resize(s) + CenterCrop(s)
                y = TF.center_crop(resize_short_side(x, s), [s, s])
            else:
                if k == 0 or not self.cfg.clip_consistent:  # one draw per frame, or one per clip
                    box = self.rrc.get_params(x, self.rrc.scale, self.rrc.ratio)
                    flip = bool(torch.rand(1) < 0.5)
                i, j, h, w = box
                y = resize_uint8(x[:, i : i + h, j : j + w], (s, s))
            hwc = y.permute(1, 2, 0).numpy()  # the kernel's channels-last output, (s, s, 3)
            out[:, k] = (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1)  # flip and de-interleave in one copy
        return torch.from_numpy(out)  # (3, T_f, H, W)

    def legacy(self, images, train):
        """The previous loader: torchvision on PIL images, then ToTensor + Normalize."""
        import torchvision.transforms.functional as TF

        if not train:
            out = [self.test_tf(im) for im in images]
        elif self.cfg.clip_consistent:
            i, j, h, w = self.rrc.get_params(images[0], self.rrc.scale, self.rrc.ratio)
            flip = bool(torch.rand(1) < 0.5)
            out = [TF.resized_crop(im, i, j, h, w, [self.cfg.size, self.cfg.size]) for im in images]
            out = [TF.hflip(im) for im in out] if flip else out
        else:
            out = [self.train_tf(im) for im in images]
        return torch.stack([self.norm(im) for im in out]).permute(1, 0, 2, 3)  # (3, T_f, H, W)


def load_image(path):
    """A frame file as a PIL RGB image (the previous loader)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path}: unreadable image ({e}); re-extract this clip's frames or remove it from the split"
        ) from e


# The decoders. JPEG: simplejpeg (libjpeg-turbo's TurboJPEG API, the library PIL and OpenCV also decode JPEGs with):
# PIL's pixels bitwise, and the fastest of the three here (docs/data.md, "The current loader"). Other images (PNG):
# OpenCV's imdecode, also PIL's pixels bitwise. EXIF orientation is ignored, as PIL's open ignores it.
_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV >= 4.10 decodes to RGB itself
_IMREAD = (cv2.IMREAD_COLOR_RGB if _RGB else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION


def load_frame(path):
    """A frame file as an (H, W, 3) uint8 RGB array (pixels bitwise PIL's, load_image's): JPEGs decoded by
    simplejpeg, other images by OpenCV."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\xff\xd8":  # JPEG; strict: corrupt data raises (PIL and OpenCV fill it in grey)
            return simplejpeg.decode_jpeg(data, "RGB", strict=True)
        img = decode_opencv(data) if data else None
    except (OSError, ValueError, cv2.error) as e:
        raise ValueError(
            f"{path}: unreadable image ({' '.join(str(e).split())}); re-extract this clip's frames or "
            "remove it from the split"
        ) from e
    if img is None:
        raise ValueError(
            f"{path}: unreadable image ({'empty file' if not data else 'not a decodable image'}); "
            "re-extract this clip's frames or remove it from the split"
        )
    return img


def decode_opencv(data):
    """Encoded image bytes -> (H, W, 3) uint8 RGB with OpenCV's imdecode (None if undecodable)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD)
    return img if img is None or _RGB else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# start and end markers of the frame files list_frames accepts; the end marker is looked for in the file's last
# TAIL bytes (writers end a JPEG at its EOI marker, a few pad bytes after it are tolerated)
_MARKERS = {
    ".jpg": (b"\xff\xd8", b"\xff\xd9"),
    ".jpeg": (b"\xff\xd8", b"\xff\xd9"),
    ".png": (b"\x89PNG\r\n\x1a\n", b"IEND"),
}
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


def normalize_frames(x):
    """uint8 frames (B, 3, T_f, H, W), as the loader gives them -> float32 x / 255, ImageNet-normalised per channel:
    the same arithmetic as torchvision's ToTensor + Normalize, once per batch on the batch's device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1, 1)
    return x.to(torch.float32).div(255).sub_(mean).div_(std)
