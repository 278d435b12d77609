"""--in-memory: random clips at a dataset's real input sizes, the model step without any data loading
(tools/benchmark.py's model-step table)."""

import torch

from common.audio import AudioConfig, LogSpectrogram
from common.splits import Clip


class InMemoryClips(torch.utils.data.Dataset):
    """`n` clips of random tensors of the given shapes (a pool of 8, repeated) with random labels. With a `frontend`
    the audio is a waveform window, as the current loader gives it, so the model step includes the spectrogram the
    model computes."""

    def __init__(self, n, audio_shape, frames_shape, class_names, seed, frontend=None):
        g = torch.Generator().manual_seed(seed)
        self.spec = torch.randn(8, *audio_shape, generator=g) * (0.1 if frontend is not None else 1.0)
        self.frames = torch.randint(0, 256, (8, *frames_shape), dtype=torch.uint8, generator=g)  # as the loader's
        self.labels = torch.randint(len(class_names), (n,), generator=g)
        self.clips = [Clip(str(i), "", "", int(y)) for i, y in enumerate(self.labels)]
        self.class_names, self.skipped, self.frontend = class_names, {}, frontend
        self.load_failures = torch.zeros(n, dtype=torch.int32)  # nothing fails to load here

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.spec[i % 8], self.frames[i % 8], self.labels[i]


def spectrogram_shape(cfg: AudioConfig):
    """(F, T) of an STFT pipeline: n_fft // 2 + 1 bins, 1 + samples // hop centred frames (CREMA-D 257 x 188)."""
    if cfg.kind != "stft":
        raise ValueError(f"--in-memory supports the STFT audio pipelines, not {cfg.kind}")
    return cfg.n_fft // 2 + 1, 1 + cfg.window_length // cfg.hop


def in_memory_datasets(class_names, audio_cfg, n_frames, size, legacy=False):
    """(train, test, class_names): random clips at the dataset's sizes, waveform windows and the front-end (the
    current loader) or spectrograms (--legacy-loader)."""
    spec = spectrogram_shape(audio_cfg)
    frontend = None if legacy else LogSpectrogram(audio_cfg.n_fft, audio_cfg.hop)
    audio = spec if legacy else (audio_cfg.window_length,)
    shapes = (audio, (3, n_frames, size, size))
    train = InMemoryClips(4096, *shapes, class_names, 0, frontend)
    return train, InMemoryClips(256, *shapes, class_names, 1, frontend), class_names
