"""Audio: the spectrogram pipelines of every dataset (docs/data.md, "Audio") and a PCM wav reader."""

import math
import os
import wave
from dataclasses import dataclass

import numpy as np
import soxr
import torch
import torchaudio


@dataclass(frozen=True)
class AudioConfig:
    """One audio pipeline (docs/data.md and 3.4). `kind` is stft | scipy | fbank."""

    kind: str
    sample_rate: int
    clip_seconds: float  # length of the window fed to the transform (0 = whole signal)
    tile_seconds: float = 0.0  # tile the waveform until it is at least this long
    train_start_max: float = 0.0  # training window start uniform over [0, this] seconds (0 = fixed start 0)
    test_start: float = 0.0  # deterministic test window start, seconds
    n_fft: int = 512
    hop: int = 353
    resampler: str = "soxr_hq"  # soxr_hq: soxr's HQ filter, librosa's default; torchaudio: the previous loader's sinc

    @property
    def window_length(self):
        """Samples in the window fed to the transform (at sample_rate; 0 = the whole signal)."""
        return int(round(self.clip_seconds * self.sample_rate))


AUDIO_PIPELINES = {
    # CREMA-D, OGM/OPM/ARL/DGL: 22,050 Hz, first 3 s of the tiled signal, STFT 512/353 -> 257 x 188
    "cremad": AudioConfig("stft", 22050, 3.0, tile_seconds=3.0, n_fft=512, hop=353),
    # KS/VGGSound default: 16 kHz, tile to >= 10 s, 5 s window (random start at train, 2.5 s at test) -> 129 x 626
    "stft16k": AudioConfig(
        "stft", 16000, 5.0, tile_seconds=10.0, train_start_max=5.0, test_start=2.5, n_fft=256, hop=128
    ),
    # historical OGM-GE KS pickles: 22,050 Hz, first 160,000 samples, scipy spectrogram, standardised -> 257 x 1004
    "pkl1004": AudioConfig("scipy", 22050, 160000 / 22050, tile_seconds=160000 / 22050, n_fft=512, hop=159),
    # OGM-GE authors' 2024 KS recipe: Kaldi fbank, 128 mel, 1024 frames -> 1024 x 128
    "fbank": AudioConfig("fbank", 16000, 0.0),
    # AUG's KS pipeline: 35,400 Hz, first 10 s, STFT 512/353 -> 257 x 1003
    "aug35k": AudioConfig("stft", 35400, 10.0, tile_seconds=10.0, n_fft=512, hop=353),
    # the synthetic set: the CREMA-D recipe at a small size, 8 kHz, 1 s, STFT 64/250 -> 33 x 33
    "synthetic": AudioConfig("stft", 8000, 1.0, tile_seconds=1.0, n_fft=64, hop=250),
}


def read_wav(path):
    """Read a PCM wav file (8/16/24/32-bit, any channel count) as mono float32 in [-1, 1], with its sample rate."""
    try:
        with wave.open(str(path), "rb") as w:
            n_ch, width, sr, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(f"{path}: unreadable wav ({e}); re-run the preprocess step for this dataset") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{path}: unsupported wav sample width {width} bytes")
    if n_ch > 1:
        x = x[: (len(x) // n_ch) * n_ch].reshape(-1, n_ch).mean(axis=1)
    return x, sr


def _data_chunk(f):
    """(offset, declared size) of the `data` chunk of an open RIFF/WAVE file, reading only the chunk headers."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    while True:
        h = f.read(8)
        if len(h) < 8:
            return None
        size = int.from_bytes(h[4:8], "little")
        if h[:4] == b"data":
            return f.tell(), size
        f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even length


def check_wav(path):
    """Start-up check of a wav, headers only: None if read_wav can read it whole, else the reason to skip it:
    "empty wav" (zero bytes or no samples), "unreadable wav" (no RIFF/WAVE header, not PCM, an unsupported sample
    width) or "truncated wav" (the data chunk declares more bytes than the file holds)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty wav"
            with wave.open(f) as w:  # what read_wav accepts
                width, n = w.getsampwidth(), w.getnframes()
            f.seek(0)
            chunk = _data_chunk(f)
    except (wave.Error, EOFError, OSError):
        return "unreadable wav"
    if width not in (1, 2, 3, 4) or chunk is None:
        return "unreadable wav"
    if n == 0:
        return "empty wav"
    offset, declared = chunk
    if declared != 0xFFFFFFFF and offset + declared > size:  # 0xFFFFFFFF: streamed, length unknown (reads to the end)
        return "truncated wav"
    return None


class LogSpectrogram(torch.nn.Module):
    """Waveform windows (..., N) -> log(|STFT| + 1e-7) (..., n_fft // 2 + 1, 1 + N // hop): the samples clipped to
    [-1, 1], a centred, reflect-padded STFT with a periodic Hann window, the magnitude (power 1). Bitwise torchaudio's
    Spectrogram(n_fft, hop, power=1.0) then log(+1e-7) (tests/test_loader_paths.py), on one clip or on a batch.

    It runs in one of two places: in the loader (AudioPipeline: the cache writer, --legacy-loader) or, for the
    current loader, on the training device inside the audio encoder (common/models.py), once per batch. The window
    is a non-persistent buffer, so it follows the model's device and stays out of checkpoints."""

    def __init__(self, n_fft, hop):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, x):
        shape = x.shape
        x = x.clamp(-1.0, 1.0).reshape(-1, shape[-1])
        s = torch.stft(
            x,
            self.n_fft,
            self.hop,
            win_length=self.n_fft,
            window=self.window.to(x.dtype),
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        return s.abs().add_(1e-7).log_().reshape(*shape[:-1], *s.shape[-2:])


def _tukey(n, alpha=0.25):
    """scipy.signal.windows.tukey(n, alpha, sym=False), written out to avoid a scipy dependency."""
    m = n + 1  # periodic window: symmetric of n+1, drop the last point
    x = np.arange(m)
    w = np.ones(m)
    width = int(np.floor(alpha * (m - 1) / 2.0))
    left = x[: width + 1]
    w[: width + 1] = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * left / alpha / (m - 1))))
    right = x[m - width - 1 :]
    w[m - width - 1 :] = 0.5 * (1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * right / alpha / (m - 1))))
    return torch.tensor(w[:n], dtype=torch.float64)


class AudioPipeline:
    """wav samples -> log spectrogram (F, T) for one AudioConfig; `train` picks the random or the fixed window."""

    def __init__(self, cfg: AudioConfig):
        self.cfg = cfg
        self._resamplers = {}
        if cfg.kind == "stft":  # centred, reflect-padded, periodic Hann; magnitude (power=1); log
            self.frontend = LogSpectrogram(cfg.n_fft, cfg.hop)
        elif cfg.kind == "scipy":
            self.window = _tukey(cfg.n_fft)

    def resample(self, x, sr):
        """float32 samples (numpy) at `sr` -> a float32 tensor at the pipeline's rate."""
        if sr == self.cfg.sample_rate:
            return torch.as_tensor(x, dtype=torch.float32)
        if self.cfg.resampler == "soxr_hq":  # what librosa.load(sr=...) does by default (res_type "soxr_hq")
            return torch.from_numpy(soxr.resample(np.asarray(x, dtype=np.float32), sr, self.cfg.sample_rate, "HQ"))
        if sr not in self._resamplers:  # the previous loader (--legacy-loader): torchaudio's windowed sinc
            self._resamplers[sr] = torchaudio.transforms.Resample(sr, self.cfg.sample_rate)
        return self._resamplers[sr](torch.as_tensor(x, dtype=torch.float32))

    def window_samples(self, x, train, generator=None):
        cfg, sr = self.cfg, self.cfg.sample_rate
        if cfg.tile_seconds > 0:  # tile until long enough (the originals tile a fixed number of times)
            need = int(round(cfg.tile_seconds * sr))
            if len(x) < need:
                x = x.repeat(math.ceil(need / len(x)))
        if cfg.clip_seconds <= 0:
            return x
        length = cfg.window_length
        if train and cfg.train_start_max > 0:
            start = int(torch.randint(0, int(round(cfg.train_start_max * sr)) + 1, (1,), generator=generator))
        else:
            start = int(round(cfg.test_start * sr))
        return x[start : start + length]

    def __call__(self, samples, sr, train, generator=None):
        return self.transform(self.waveform(samples, sr, train, generator))

    def waveform(self, samples, sr, train, generator=None):
        """The window's samples at the pipeline's rate (what the current loader hands over for an STFT pipeline)."""
        return self.window_samples(self.resample(samples, sr), train, generator)

    def transform(self, x):
        """The window's samples -> the pipeline's spectrogram (clipped to [-1, 1] first)."""
        if self.cfg.kind == "stft":
            return self.frontend(x)
        x = x.clamp(-1.0, 1.0)
        if self.cfg.kind == "scipy":  # scipy.signal.spectrogram defaults: detrend constant, one-sided PSD, no centring
            seg = x.double().unfold(0, self.cfg.n_fft, self.cfg.hop)
            seg = seg - seg.mean(dim=1, keepdim=True)
            s = torch.fft.rfft(seg * self.window, dim=1).abs() ** 2 / (self.cfg.sample_rate * (self.window**2).sum())
            s[:, 1:-1] *= 2.0
            s = torch.log(s.T + 1e-7)
            return ((s - s.mean()) / (s.std() + 1e-9)).float()
        # Kaldi fbank (docs/data.md)
        fb = torchaudio.compliance.kaldi.fbank(
            (x - x.mean()).unsqueeze(0),
            htk_compat=True,
            sample_frequency=self.cfg.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=128,
            dither=0.0,
            frame_shift=10,
        )
        fb = torch.nn.functional.pad(fb, (0, 0, 0, max(0, 1024 - fb.shape[0])))[:1024]
        return (fb + 4.503877) / (2 * 5.141276)  # (time, mel)
