"""A user's model unlike the project's, for the lift tests (tests/test_lift_mlp.py) and the learning-rate sweep
(tests/lr_sweep.py): two ReLU MLP encoders of unequal widths that are not 512 (D_A = 24, D_V = 40) and one plain
`nn.Linear` head on the concatenated features; data on which audio is the easy modality and visual the harder one.

Not a test file (pytest does not collect it).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

C = 4  # classes
IN_A, IN_V = 10, 12  # input sizes
D_A, D_V = 24, 40  # encoder widths (feature sizes)
HIDDEN = 32


def mlp(n_in, width):
    """Linear -> ReLU -> Linear -> ReLU: the features are non-negative, like pooled ResNet features."""
    return nn.Sequential(nn.Linear(n_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, width), nn.ReLU())


class MLPModel(nn.Module):
    """audio_net, visual_net (ReLU MLPs), head = nn.Linear(d_a + d_v, C) on [a; v]; forward -> (a, v, z)."""

    def __init__(self, d_a=D_A, d_v=D_V, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.audio_net, self.visual_net = mlp(IN_A, d_a), mlp(IN_V, d_v)
        self.head = nn.Linear(d_a + d_v, C)

    def forward(self, x_a, x_v):
        a, v = self.audio_net(x_a), self.visual_net(x_v)
        return a, v, self.head(torch.cat([a, v], 1))


def split_logits(head, a, v, bias):
    """The adapter a plain concat head needs: its audio and visual column blocks (widths read off the features),
    with half the bias each ("half": they sum to the fused logits) or all of it ("full": zero-fill)."""
    d_a = a.shape[1]
    w, b = head.weight, head.bias * (0.5 if bias == "half" else 1.0)
    return a @ w[:, :d_a].T + b, v @ w[:, d_a:].T + b


# one fixed pair of class templates for every split and seed (the task), drawn from a generator of its own
_g = torch.Generator().manual_seed(12345)
TEMPLATES = (torch.randn(C, IN_A, generator=_g), torch.randn(C, IN_V, generator=_g))
NOISE_A, NOISE_V = 0.3, 1.6  # audio nearly noise-free (easy), visual noisy (learnable alone, harder)


class ConcatHead(nn.Module):
    """The adapter docs/dgl.md gives: DGL's head(a, v) -> (f_a, f_v, z) around the user's nn.Linear on the concat."""

    def __init__(self, fc):
        super().__init__()
        self.fc = fc

    def forward(self, a, v):
        return a, v, self.fc(torch.cat([a, v], 1))


def zero_fill(head, f_a, f_v):
    """DGL's readout for ConcatHead: zero-fill unimodal logits (full bias) of the head it is handed."""
    return split_logits(head.fc, f_a, f_v, "full")


def make_data(n, seed, dominant="audio"):
    """(x_a, x_v, y): n samples, balanced classes in shuffled order, each modality = its class template + Gaussian
    noise. dominant="visual" swaps the noise levels."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % C)[torch.randperm(n, generator=g)]
    s_a, s_v = (NOISE_A, NOISE_V) if dominant == "audio" else (NOISE_V, NOISE_A)
    x_a = TEMPLATES[0][y] + s_a * torch.randn(n, IN_A, generator=g)
    x_v = TEMPLATES[1][y] + s_v * torch.randn(n, IN_V, generator=g)
    return x_a, x_v, y


def joint_steps(model, steps=40, lr=0.05, seed=0, n=256, dominant="audio"):
    """A few full-batch steps of joint training (fused CE only, SGD): the easy modality becomes dominant."""
    x_a, x_v, y = make_data(n, seed, dominant)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x_a, x_v)[2], y).backward()
        opt.step()
    model.zero_grad()
    return x_a, x_v, y


def probe_accuracy(encoder, train, test, steps=300):
    """A linear probe (softmax regression, full-batch Adam) on the frozen encoder's features: test accuracy."""
    with torch.no_grad():
        f_train, f_test = encoder(train[0]), encoder(test[0])
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6  # standardised, so the probe's LR suits any feature scale
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    probe = nn.Linear(f_train.shape[1], C)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(f_train), train[1]).backward()
        opt.step()
    with torch.no_grad():
        return (probe(f_test).argmax(1) == test[1]).float().mean().item()
