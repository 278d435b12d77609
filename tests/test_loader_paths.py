"""The current loader against the previous one (--legacy-loader) and against the reference recipe (docs/data.md,
"The current loader and the previous one"): soxr resampling instead of torchaudio's; uint8 frames cropped and resized
by torch's uint8 kernel and normalised by the visual encoder, instead of PIL crops and resizes and float frames
normalised in the loader."""

import argparse
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest
import soxr
import torch
import torchaudio
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common.audio import AUDIO_PIPELINES, AudioPipeline, LogSpectrogram, read_wav
from common.data import build_datasets
from common.flags import add_data_args
from common.frames import (
    FrameConfig,
    FrameTransform,
    check_image,
    list_frames,
    load_frame,
    load_image,
    normalize_frames,
    resize_uint8,
)
from common.models import AudioEncoder, VisualEncoder


def speech_like(seconds=2.4, sr=16000, seed=0):
    """A voiced, amplitude-modulated harmonic signal (f0 ~140 Hz, 29 harmonics) plus weak white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 * (1 + 0.1 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t) ** 2)
    return (0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def reference_cremad(x, sr):
    """The CREMA-D recipe written out in float64 numpy: librosa.load(sr=22050)'s default resampler (soxr HQ), tile,
    first 3 s, clip, centred reflect-padded STFT 512/353 with a periodic Hann window, log(|S| + 1e-7)."""
    y = soxr.resample(x.astype(np.float64), sr, 22050, "HQ")
    y = np.tile(y, int(np.ceil(66150 / len(y))))[:66150].clip(-1, 1)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(y, 256, mode="reflect"), 512)[::353]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    return np.log(np.abs(np.fft.rfft(frames * window, axis=1)).T + 1e-7)


@pytest.fixture(scope="module")
def spectrograms():
    x = speech_like()
    cfg = AUDIO_PIPELINES["cremad"]
    current = AudioPipeline(cfg)(x, 16000, train=False).numpy()
    previous = AudioPipeline(replace(cfg, resampler="torchaudio"))(x, 16000, train=False).numpy()
    return current, previous, reference_cremad(x, 16000)


def test_current_spectrogram_is_the_reference_recipe(spectrograms):
    """Bins within 60 dB of the peak agree with the float64 reference to 1e-4 in log magnitude; the median bin to
    1e-5 (the rest is float32 rounding in near-silent bins)."""
    current, _, ref = spectrograms
    assert current.shape == ref.shape == (257, 188)
    d = np.abs(current - ref)
    loud = ref > ref.max() - np.log(1000)
    assert loud.mean() > 0.3 and d[loud].max() < 1e-4
    assert np.median(d) < 1e-5


def test_current_spectrogram_against_the_previous_resampler(spectrograms):
    """Below 7 kHz the two resamplers agree: bins within 40 dB of the peak to 0.3 in log magnitude (median 0.005).
    Above 8 kHz, where a 16 kHz recording has nothing, soxr leaves at least 6 nepers (~50 dB) less leakage than
    torchaudio's sinc filter; the 7.6-8 kHz transition band is where they differ most."""
    current, previous, _ = spectrograms
    hz = np.arange(257) * 22050 / 512
    below = (hz < 7000)[:, None] & (previous > previous.max() - np.log(100))
    d = np.abs(current - previous)
    assert d[below].max() < 0.3 and np.median(d[below]) < 0.005
    above = hz >= 8000
    assert previous[above].mean() - current[above].mean() > 6.0


def test_log_spectrogram_is_torchaudio_then_log_bitwise_on_a_clip_and_on_a_batch():
    """LogSpectrogram (the loader's and the model's front-end) = torchaudio's Spectrogram(power=1) of the clipped
    samples, then log(+1e-7): bitwise per clip, and a batch (B, 1, N) gives each clip's bitwise."""
    torch.manual_seed(0)
    x = torch.randn(5, 1, 66150) * 0.4  # some samples beyond [-1, 1]: clipped first
    ta = torchaudio.transforms.Spectrogram(
        n_fft=512, hop_length=353, win_length=512, power=1.0, center=True, pad_mode="reflect"
    )
    want = torch.stack([ta(x[b, 0].clamp(-1, 1)).add(1e-7).log() for b in range(5)])[:, None]
    got = LogSpectrogram(512, 353)(x)
    assert got.shape == (5, 1, 257, 188) and torch.equal(got, want)
    assert torch.equal(LogSpectrogram(512, 353)(x[2, 0]), want[2, 0])
    assert not torch.equal(got, LogSpectrogram(512, 353)(x.clamp(-0.5, 0.5)))


def test_the_audio_encoder_computes_the_spectrogram_of_a_waveform_batch():
    """A (B, 1, N) batch goes through the front-end on the model's side: the features equal those of the
    spectrogram the loader used to hand over, bitwise; a waveform without a front-end is a clear error; the
    front-end has no state in the checkpoint."""
    torch.manual_seed(0)
    enc = AudioEncoder(LogSpectrogram(64, 250)).eval()
    wave = torch.randn(3, 1, 8000) * 0.2
    pipe = AudioPipeline(AUDIO_PIPELINES["synthetic"])
    spec = torch.stack([pipe.transform(wave[b, 0]) for b in range(3)])[:, None]
    with torch.no_grad():
        assert torch.equal(enc(wave), enc(spec))
    assert set(enc.state_dict()) == set(AudioEncoder().state_dict())
    with pytest.raises(ValueError, match="needs the dataset's front-end"):
        AudioEncoder()(wave)


def test_the_frontend_is_only_for_uncached_stft_audio_of_the_current_loader(tmp_path):
    from common.synthetic import generate
    from preprocess import cache

    generate(os.path.join(tmp_path, "synthetic"), n_train=6, n_test=3)
    cache.main(["--dataset", "synthetic", "--data-root", str(tmp_path), "--workers", "1", "--frame-side", "24"])
    train = datasets(str(tmp_path))[0]
    assert isinstance(train.frontend, LogSpectrogram) and train.frontend is not train.frontend  # a new one each time
    assert train[0][0].shape == (8000,)  # 1 s at 8 kHz
    samples, sr = read_wav(train.clips[0].wav)
    assert torch.equal(train.frontend(train[0][0]), train.audio(samples, sr, False))
    assert datasets(str(tmp_path), "--legacy-loader")[0].frontend is None
    assert datasets(str(tmp_path), "--cache", "--cache-frame-side", "24")[0].frontend is None
    assert datasets(str(tmp_path), "--audio-pipeline", "pkl1004")[0].frontend is None


def test_soxr_is_deterministic_and_float32():
    x = speech_like(seconds=1.3, seed=1)
    pipe = AudioPipeline(AUDIO_PIPELINES["cremad"])
    a, b = pipe.resample(x, 16000), pipe.resample(x, 16000)
    assert a.dtype == torch.float32 and torch.equal(a, b) and len(a) == round(len(x) * 22050 / 16000)


# ---------------------------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------------------------
def photo(w=96, h=72, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.float64)
    return Image.fromarray(np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8))


def torchvision_on_pil(images, cfg, train):
    """The frame recipe as torchvision states it, on PIL images, to uint8 (the reference of the current path):
    RandomResizedCrop(size, scale) + RandomHorizontalFlip(0.5) per frame (or one draw per clip), Resize((s, s)) or
    Resize(s) + CenterCrop(s) at test."""
    s = cfg.size
    if not train:
        tf = T.Resize((s, s)) if cfg.test_resize == "square" else T.Compose([T.Resize(s), T.CenterCrop(s)])
        out = [tf(im) for im in images]
    elif cfg.clip_consistent:
        i, j, h, w = T.RandomResizedCrop.get_params(images[0], cfg.crop_scale, (3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < 0.5)
        out = [TF.resized_crop(im, i, j, h, w, [s, s]) for im in images]
        out = [TF.hflip(im) for im in out] if flip else out
    else:
        tf = T.Compose([T.RandomResizedCrop(s, scale=cfg.crop_scale), T.RandomHorizontalFlip(0.5)])
        out = [tf(im) for im in images]
    return torch.stack([TF.pil_to_tensor(im) for im in out], 1)


FRAME_CFGS = [
    dict(),
    dict(n_frames=3),
    dict(n_frames=3, clip_consistent=True),
    dict(crop_scale=(0.25, 1.0), test_resize="center"),
    dict(size=40),
    dict(size=224),
]


@pytest.mark.parametrize("cfg", FRAME_CFGS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("source", [(96, 72), (480, 360), (40, 40)])
def test_frames_are_torchvision_on_pil_within_two_levels(cfg, train, source):
    """The same crop boxes and flips (torchvision's draws, in its order: a different draw would move whole edges,
    tens of levels), and resizes within 2 of 255 levels of PIL's antialiased bilinear, below 0.3 on average per frame
    (0.02 over all these cases); downscaled, upscaled and same-size crops (sources of 96 x 72, 480 x 360, 40 x 40)."""
    cfg = FrameConfig(**{"size": 32, **cfg})
    tf = FrameTransform(cfg)
    images = [photo(*source, seed=s) for s in range(cfg.n_frames)]
    arrays = [np.array(im) for im in images]
    for seed in range(6):
        torch.manual_seed(seed)
        got = tf(arrays, train)
        after = torch.rand(1)
        torch.manual_seed(seed)
        want = torchvision_on_pil(images, cfg, train)
        assert torch.equal(torch.rand(1), after)  # the same number of draws
        assert got.dtype == torch.uint8 and got.shape == want.shape == (3, cfg.n_frames, cfg.size, cfg.size)
        d = (got.int() - want.int()).abs()
        assert d.max() <= 2 and d.float().mean() < 0.3


@pytest.mark.parametrize("cfg", FRAME_CFGS[:4])
@pytest.mark.parametrize("train", [True, False])
def test_previous_loader_frames_are_torchvision_on_pil_normalised_bitwise(cfg, train):
    """--legacy-loader: the torchvision recipe on PIL images, then ToTensor + Normalize in the loader, bitwise; and
    the current frames normalised by the encoder are within 2 levels of it (2 / 255 / std)."""
    cfg = FrameConfig(**{"size": 32, **cfg})
    old, cur = FrameTransform(replace(cfg, legacy=True)), FrameTransform(cfg)
    images = [photo(seed=s) for s in range(cfg.n_frames)]
    for seed in range(4):
        torch.manual_seed(seed)
        b = old(images, train)
        torch.manual_seed(seed)
        want = torchvision_on_pil(images, cfg, train)
        torch.manual_seed(seed)
        a = cur([np.array(im) for im in images], train)
        assert b.dtype == torch.float32 and torch.equal(b, normalize_frames(want[None])[0])
        assert (normalize_frames(a[None])[0] - b).abs().max() <= 2 / 255 / 0.224 + 1e-6


def test_resize_uint8_against_pil_on_a_photograph():
    """resize_uint8 against PIL's bilinear resize (antialiased when shrinking) of a 480 x 360 photograph-like frame to
    224 x 224, 112 x 150 and 600 x 450: within 1 level, 0.05 on average."""
    im = photo(480, 360, seed=3)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    for h, w in ((224, 224), (112, 150), (450, 600)):
        want = torch.from_numpy(np.array(im.resize((w, h), Image.BILINEAR))).permute(2, 0, 1).int()
        d = (resize_uint8(x, (h, w)).int() - want).abs()
        assert d.max() <= 1 and d.float().mean() < 0.05


def test_load_frame_is_load_image_as_an_array(tmp_path, monkeypatch):
    """The current loader's decoders give PIL's pixels bitwise: simplejpeg for JPEGs (several qualities and chroma
    subsamplings, progressive, an odd size, one written by OpenCV, pixel noise, greyscale), OpenCV for RGB, greyscale
    and RGBA PNGs. JPEGs never reach OpenCV."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (50, 70, 3)).astype(np.uint8))
    files = []
    for q, sub, prog in ((95, 0, False), (75, 2, False), (50, 1, False), (100, 2, False), (90, 2, True)):
        files.append(tmp_path / f"q{q}_{sub}_{prog}.jpg")
        photo(seed=q).save(files[-1], quality=q, subsampling=sub, progressive=prog)
    files.append(tmp_path / "odd.jpg")
    photo(333, 221, seed=4).save(files[-1], quality=90)
    files.append(tmp_path / "opencv.jpg")
    cv2.imwrite(str(files[-1]), np.array(photo(seed=8))[:, :, ::-1])
    for name, im in (
        ("noise.jpg", noise),
        ("grey.jpg", noise.convert("L")),
        ("rgb.png", photo(seed=5)),
        ("grey.png", photo(seed=6).convert("L")),
        ("rgba.png", photo(seed=7).convert("RGBA")),
    ):
        files.append(tmp_path / name)
        im.save(files[-1])
    imdecode, decoded = cv2.imdecode, []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1) or imdecode(*a))
    for p in files:
        a = load_frame(str(p))
        want = np.array(load_image(str(p)))
        assert a.dtype == np.uint8 and a.shape == want.shape and a.shape[2] == 3, p
        assert np.array_equal(a, want), p
    assert len(decoded) == 3  # the PNGs only


def test_a_corrupt_jpeg_fails_to_load_instead_of_decoding_grey(tmp_path):
    """A JPEG cut in the middle but ending in its EOI marker passes the start-up check; PIL (the previous loader)
    decodes it, the missing half grey; the current loader raises the one-line error, so the clip is replaced and
    counted (test_bad_files.py)."""
    p = tmp_path / "cut.jpg"
    photo(96, 72, seed=1).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    assert check_image(str(p)) is None
    assert load_image(str(p)).size == (96, 72)
    with pytest.raises(ValueError, match=r"cut\.jpg: unreadable image \(Corrupt JPEG data"):
        load_frame(str(p))


def test_normalize_frames_is_totensor_then_normalize():
    x = torch.randint(0, 256, (2, 3, 2, 5, 7), dtype=torch.uint8)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    want = torch.stack([torch.stack([norm(x[b, :, t].float() / 255) for t in range(2)], 1) for b in range(2)])
    got = normalize_frames(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got.mean().abs() < 2.5 and not torch.equal(got, x.float() / 255)


def test_the_visual_encoder_normalises_uint8_and_passes_float_through():
    torch.manual_seed(0)
    enc = VisualEncoder().eval()
    x = torch.randint(0, 256, (2, 3, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(enc(x), enc(normalize_frames(x)))
        assert not torch.allclose(enc(x), enc(x.float()))


def coordinate_image(w=64, h=48):
    """Red = column, green = row (scaled to 0..255), blue = 0: a crop's pixels tell where it came from."""
    xs, ys = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8))


def test_training_crops_flips_and_scale_distribution():
    """From the pixels of 400 training outputs: flipped about half the time (a decreasing red ramp), crop areas
    within RandomResizedCrop's scale (0.08, 1) of the source, with the mean of its draws (about 0.5)."""
    tf = FrameTransform(FrameConfig(size=24))
    im = np.array(coordinate_image())
    torch.manual_seed(0)
    flips, areas = 0, []
    for _ in range(400):
        out = tf([im], True)[:, 0].float()  # (3, 24, 24) uint8 -> float
        red, green = out[0], out[1]
        flips += bool(red[:, 0].mean() > red[:, -1].mean())
        width = (red.max() - red.min() + 255 / 63) / (255 + 255 / 63)  # the crop's share of the columns
        height = (green.max() - green.min() + 255 / 47) / (255 + 255 / 47)
        areas.append((width * height).item())
    assert 160 <= flips <= 240
    assert min(areas) > 0.08 * 0.8 and max(areas) <= 1.0 + 1e-6
    assert 0.4 < np.mean(areas) < 0.65


# ---------------------------------------------------------------------------------------------------------------
# the datasets end to end, files and cache
# ---------------------------------------------------------------------------------------------------------------
def datasets(data_root, *flags):
    args = add_data_args(argparse.ArgumentParser()).parse_args(["--data-root", data_root, *flags])
    return build_datasets(args)


@pytest.mark.parametrize("split", [0, 1])
def test_dataset_items_current_vs_previous(tiny_data, split):
    """Same clips, same labels, frames within 2 levels after normalisation, spectrograms close (the synthetic set's
    16 -> 8 kHz resampling: soxr vs torchaudio)."""
    cur, old = datasets(tiny_data)[split], datasets(tiny_data, "--legacy-loader")[split]
    assert [c.clip_id for c in cur.clips] == [c.clip_id for c in old.clips]
    assert old.frontend is None and cur.frontend is not None
    for i in range(4):
        torch.manual_seed(i)
        s_a, f_a, y_a = cur[i]
        s_a = cur.frontend(s_a)  # the waveform window; the model computes its spectrogram
        torch.manual_seed(i)
        s_b, f_b, y_b = old[i]
        assert y_a == y_b and f_a.dtype == torch.uint8
        assert (normalize_frames(f_a[None])[0] - f_b).abs().max() <= 2 / 255 / 0.224 + 1e-6
        loud = s_b > s_b.max() - np.log(100)
        assert (s_a - s_b)[loud].abs().median() < 0.05


def test_cached_frames_current_vs_previous(tmp_path):
    from common.synthetic import generate
    from preprocess import cache

    tiny_data = str(tmp_path)  # a set of its own: the cache is written into it
    generate(os.path.join(tiny_data, "synthetic"), n_train=8, n_test=4)
    for legacy in ([], ["--legacy-loader"]):
        cache.main(
            ["--dataset", "synthetic", "--data-root", tiny_data, "--workers", "1", "--frame-side", "24", *legacy]
        )
    cur = datasets(tiny_data, "--cache", "--cache-frame-side", "24")[0]
    old = datasets(tiny_data, "--cache", "--cache-frame-side", "24", "--legacy-loader")[0]
    assert cur.audio_cache != old.audio_cache  # the resampler is part of the cache key
    for i in range(3):
        torch.manual_seed(i)
        _, f_a, _ = cur[i]
        torch.manual_seed(i)
        _, f_b, _ = old[i]
        assert (normalize_frames(f_a[None])[0] - f_b).abs().max() <= 2 / 255 / 0.224 + 1e-6
    clip = cur.clips[0]
    samples, sr = read_wav(clip.wav)
    spec = np.load(os.path.join(cur.audio_cache, f"{clip.clip_id}.npy"))
    assert np.array_equal(spec, cur.audio(samples, sr, False).numpy())
    frames = list_frames(clip.frame_dir)
    assert load_image(os.path.join(clip.frame_dir, frames[0])).size == (40, 40)
