"""ResNet18 audio/visual encoders, fusion heads and the unimodal-logit helper (docs/models.md).

Nothing here is method logic: every method builds `AVClassifier(...)` and reads unimodal logits with
`unimodal_logits(head, a, v, bias="half" | "full")`, stating its own bias convention.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.frames import normalize_frames

FUSIONS = ("concat", "sum", "film", "gated")


class ResNet18Trunk(nn.Module):
    """torchvision's ResNet18 without avgpool/fc: returns the layer-4 map (docs/models.md)."""

    def __init__(self, in_channels: int):
        super().__init__()
        import torchvision  # here, not at the top: torchvision imports torch._dynamo (about 1 s), after the checks

        r = torchvision.models.resnet18(weights=None)
        if in_channels != 3:
            r.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AudioEncoder(nn.Module):
    """(B, 1, F, T) spectrogram -> (B, 512) feature `a`. A waveform batch (B, 1, N), which the current loader gives
    for the STFT pipelines, goes through `frontend` first (the dataset's, common/audio.py LogSpectrogram: the
    log spectrogram, computed here on the model's device once per batch); a spectrogram is taken as it is."""

    def __init__(self, frontend=None):
        super().__init__()
        self.trunk = ResNet18Trunk(1)
        self.frontend = frontend

    def forward(self, x):
        if x.dim() == 3:
            if self.frontend is None:
                raise ValueError(
                    f"AudioEncoder: a waveform batch {tuple(x.shape)} needs the dataset's front-end: "
                    "build the model with AVClassifier(..., audio_frontend=train_set.frontend)"
                )
            x = self.frontend(x)
        return torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1)


class VisualEncoder(nn.Module):
    """(B, 3, T_f, H, W) frames -> (B, 512) feature `v`: frames folded into the batch, then pooled over time and
    space. uint8 frames (the loader's) are normalised first; float frames are taken as already normalised."""

    def __init__(self):
        super().__init__()
        self.trunk = ResNet18Trunk(3)

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = normalize_frames(x)
        b, c, t, h, w = x.shape  # batch size from the tensor, so a final partial batch works
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        m = self.trunk(x)
        m = m.reshape(b, t, *m.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 512, T_f, h', w')
        return torch.flatten(F.adaptive_avg_pool3d(m, 1), 1)


class ConcatHead(nn.Module):
    """z = W [a ; v] + b, audio in the first 512 inputs."""

    def __init__(self, num_classes, dim=512):
        super().__init__()
        self.fc_out = nn.Linear(2 * dim, num_classes)

    def forward(self, a, v):
        return a, v, self.fc_out(torch.cat((a, v), dim=1))


class SumHead(nn.Module):
    """z = (W_x a + b_x) + (W_y v + b_y)."""

    def __init__(self, num_classes, dim=512):
        super().__init__()
        self.fc_x = nn.Linear(dim, num_classes)
        self.fc_y = nn.Linear(dim, num_classes)

    def forward(self, a, v):
        return a, v, self.fc_x(a) + self.fc_y(v)


class FiLMHead(nn.Module):
    """Audio conditions visual: gamma, beta = split(fc(a)); z = fc_out(gamma * v + beta). `x_film=False` mirrors it."""

    def __init__(self, num_classes, dim=512, x_film=True):
        super().__init__()
        self.fc = nn.Linear(dim, 2 * dim)
        self.fc_out = nn.Linear(dim, num_classes)
        self.x_film = x_film

    def forward(self, a, v):
        film, to_be_filmed = (a, v) if self.x_film else (v, a)
        gamma, beta = torch.split(self.fc(film), film.shape[1], dim=1)
        return a, v, self.fc_out(gamma * to_be_filmed + beta)


class GatedHead(nn.Module):
    """Audio gates visual: z = fc_out(sigmoid(fc_x(a)) * fc_y(v)); exposes the projected features u_a, u_v."""

    def __init__(self, num_classes, dim=512, x_gate=True):
        super().__init__()
        self.fc_x = nn.Linear(dim, dim)
        self.fc_y = nn.Linear(dim, dim)
        self.fc_out = nn.Linear(dim, num_classes)
        self.x_gate = x_gate

    def forward(self, a, v):
        u_a, u_v = self.fc_x(a), self.fc_y(v)
        gate, gated = (u_a, u_v) if self.x_gate else (u_v, u_a)
        return u_a, u_v, self.fc_out(torch.sigmoid(gate) * gated)


HEADS = {"concat": ConcatHead, "sum": SumHead, "film": FiLMHead, "gated": GatedHead}


def unimodal_logits(head, f_a, f_v, bias):
    """Per-modality logits read out of a fusion head (docs/models.md). No default: every call site picks.

    bias="half": concat splits the bias in two so z_a + z_v == z (OGM, OPM).
    bias="full": concat gives the full bias to both, z_a = W[a;0] + b (ARL, DGL).
    The sum head uses each branch's own full bias under both conventions (then z_a + z_v == z).
    The gated head has the self-gate form of docs/models.md (each modality gates itself), taking the
    projected features the head exposes. FiLM has no unimodal logits, nor has a modality whose feature is None (a
    unimodal model's missing one): None for it.
    """
    if bias not in ("half", "full"):
        raise ValueError(f"unimodal_logits: bias must be 'half' or 'full', got {bias!r}")
    if isinstance(head, FiLMHead):
        return None, None
    if f_a is None or f_v is None:
        present = f_a if f_v is None else f_v
        z_a, z_v = unimodal_logits(
            head,
            present if f_a is not None else torch.zeros_like(present),
            present if f_v is not None else torch.zeros_like(present),
            bias,
        )
        return (z_a if f_a is not None else None), (z_v if f_v is not None else None)
    if isinstance(head, ConcatHead):
        w, b = head.fc_out.weight, head.fc_out.bias
        d = f_a.shape[1]
        scale = 0.5 if bias == "half" else 1.0
        return f_a @ w[:, :d].T + scale * b, f_v @ w[:, d:].T + scale * b
    if isinstance(head, SumHead):
        return head.fc_x(f_a), head.fc_y(f_v)
    if isinstance(head, GatedHead):
        return head.fc_out(torch.sigmoid(f_a) * f_a), head.fc_out(torch.sigmoid(f_v) * f_v)
    raise ValueError(f"unimodal_logits: no unimodal logits for a {type(head).__name__}")


def init_weights(module):
    """The shared initialiser (docs/models.md): convs Kaiming fan_out, BN (1, 0), Linear Xavier-normal with bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


class AVClassifier(nn.Module):
    """Two ResNet18 encoders and a fusion head, with explicit roles `audio_net`, `visual_net`, `head`.

    forward(audio, visual) -> (f_a, f_v, z): the features the head exposes and the fused logits.
    `audio_frontend`: the training set's `frontend` (the audio encoder's, for waveform batches), or None.
    `modality` "audio" or "visual": a unimodal model (baseline.py's unimodal baselines). The other encoder is frozen
    and never run, the head gets zeros for its feature, and forward returns None for it.
    """

    def __init__(self, num_classes, fusion="concat", audio_frontend=None, modality="both"):
        super().__init__()
        if fusion not in HEADS:
            raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        self.audio_net = AudioEncoder(audio_frontend)
        self.visual_net = VisualEncoder()
        self.head = HEADS[fusion](num_classes)
        init_weights(self)
        self.modality = modality
        if modality != "both":  # no gradient ever reaches it: frozen, so DDP and the optimizer leave it alone
            (self.visual_net if modality == "audio" else self.audio_net).requires_grad_(False)

    def forward(self, audio, visual):
        if self.modality == "both":
            return self.head(self.audio_net(audio), self.visual_net(visual))
        f = self.audio_net(audio) if self.modality == "audio" else self.visual_net(visual)
        f_a, f_v, z = self.head(*((f, torch.zeros_like(f)) if self.modality == "audio" else (torch.zeros_like(f), f)))
        return (f_a, None, z) if self.modality == "audio" else (None, f_v, z)
