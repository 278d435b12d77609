"""Small two-encoder models and batches for tests/test_mmpareto.py (float64 by default); test_inforeg.py uses the
conv model and the batches too.

ConvEncoder: 8 numbers -> (1, 2, 4) map -> Conv2d(1, 4, 3) -> BatchNorm2d -> ReLU -> Linear(32, dim): conv kernels,
BN weights and biases and a Linear, so every kind of parameter the methods treat differently is there.
MLPEncoder: Linear(8, hidden) -> ReLU -> Linear(hidden, dim), no BN, widths other than 512.
TwoEncoderModel names its parts as the releases do (audio_net, visual_net, head, head_audio, head_video), so a
transcription that selects parameters by name (MMPareto.py L74-84, L184-189) selects the same ones as the roles.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvEncoder(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(32, dim)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x.view(-1, 1, 2, 4)))).flatten(1))


class MLPEncoder(nn.Module):
    def __init__(self, dim=6, hidden=5):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TwoEncoderModel(nn.Module):
    """forward(x_a, x_v) -> (a, v, z, z_a, z_v): features, fused logits of the concat Linear head, and the logits of
    the two separate unimodal heads (MMPareto's; InfoReg's release builds them but never trains them)."""

    def __init__(self, kind="conv", dims=(6, 6), classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        enc = ConvEncoder if kind == "conv" else MLPEncoder
        self.audio_net, self.visual_net = enc(dims[0]), enc(dims[1])
        if kind == "mlp":
            self.visual_net = MLPEncoder(dims[1], hidden=7)
        self.head = nn.Linear(dims[0] + dims[1], classes)
        self.head_audio, self.head_video = nn.Linear(dims[0], classes), nn.Linear(dims[1], classes)
        self.dims = dims

    def forward(self, x_a, x_v):
        a, v = self.audio_net(x_a), self.visual_net(x_v)
        return a, v, self.head(torch.cat([a, v], 1)), self.head_audio(a), self.head_video(v)

    def half_bias_logits(self, a, v):
        """InfoReg's unimodal logits (main.py L361-363): the live concat head's halves, each with half the bias."""
        w, b = self.head.weight, self.head.bias
        return a @ w[:, : self.dims[0]].T + b / 2, v @ w[:, self.dims[0] :].T + b / 2


def batches(n_batches, dominant="audio", batch=16, classes=4, seed=0, dtype=torch.float64):
    """The dominant modality's 8 inputs encode the label (plus noise); the other's are pure noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        informative = 2.0 * F.one_hot(y, 8).to(dtype) + 0.3 * torch.randn(batch, 8, generator=g, dtype=dtype)
        noise = torch.randn(batch, 8, generator=g, dtype=dtype)
        x_a, x_v = (informative, noise) if dominant == "audio" else (noise, informative)
        out.append((x_a, x_v, y))
    return out


def max_param_diff(m1, m2):
    return max(
        (p1 - p2).abs().max().item()
        for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values())
        if p1.is_floating_point()
    )
