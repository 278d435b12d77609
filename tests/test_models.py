"""Encoders, initialisation, fusion heads and unimodal logits (docs/models.md)."""

import math

import pytest
import torch

from common.models import AudioEncoder, AVClassifier, ConcatHead, GatedHead, SumHead, VisualEncoder, unimodal_logits


@pytest.mark.parametrize(
    "shape", [(257, 188), (129, 626), (257, 1004), (257, 1003), (1024, 128), (257, 1250), (33, 33)]
)
def test_audio_encoder_shapes(shape):
    enc = AudioEncoder().eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 1, *shape)).shape == (2, 512)


@pytest.mark.parametrize("frames,size", [(1, 224), (3, 224), (3, 112), (1, 32)])
def test_visual_encoder_shapes(frames, size):
    enc = VisualEncoder().eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 3, frames, size, size)).shape == (2, 512)


def test_visual_folding_is_mean_over_frames():
    torch.manual_seed(0)
    enc = VisualEncoder().eval()
    x = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        per_frame = torch.stack([enc(x[:, :, t : t + 1]) for t in range(3)]).mean(0)
        assert torch.allclose(enc(x), per_frame, atol=1e-5)


def test_initialisation():
    torch.manual_seed(0)
    model = AVClassifier(6)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 10_000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert abs(m.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.1
    w = model.head.fc_out.weight
    assert abs(w.std().item() / math.sqrt(2 / (1024 + 6)) - 1) < 0.1


def test_parameter_counts_and_roles():
    model = AVClassifier(6)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.audio_net) == 11_170_240
    assert count(model.visual_net) == 11_176_512
    assert count(model.head) == 1024 * 6 + 6
    roles = [set(map(id, getattr(model, r).parameters())) for r in ("audio_net", "visual_net", "head")]
    assert sum(map(len, roles)) == len(list(model.parameters()))
    assert not (roles[0] & roles[1] or roles[0] & roles[2] or roles[1] & roles[2])


def _random_bias(head):
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_()


def test_concat_half_bias_split_adds_up_to_fused_logits():
    torch.manual_seed(0)
    head = ConcatHead(6)
    _random_bias(head)
    a, v = torch.randn(5, 512), torch.randn(5, 512)
    _, _, z = head(a, v)
    z_a, z_v = unimodal_logits(head, a, v, bias="half")
    assert torch.allclose(z_a + z_v, z, atol=1e-5)
    assert not torch.allclose(z_a, unimodal_logits(head, a, v, bias="full")[0])


def test_concat_zero_fill():
    torch.manual_seed(0)
    head = ConcatHead(6)
    _random_bias(head)
    a, v = torch.randn(5, 512), torch.randn(5, 512)
    _, _, z = head(a, v)
    z_a, z_v = unimodal_logits(head, a, v, bias="full")
    w, b = head.fc_out.weight, head.fc_out.bias
    assert torch.allclose(z_a, a @ w[:, :512].T + b, atol=1e-5)
    assert torch.allclose(z_a, head(a, torch.zeros_like(v))[2], atol=1e-5)
    assert torch.allclose(z_a + z_v - b, z, atol=1e-5)


@pytest.mark.parametrize("bias", ["half", "full"])
def test_sum_head_full_branch_bias(bias):
    torch.manual_seed(0)
    head = SumHead(6)
    _random_bias(head)
    a, v = torch.randn(5, 512), torch.randn(5, 512)
    z_a, z_v = unimodal_logits(head, a, v, bias=bias)
    assert torch.allclose(z_a + z_v, head(a, v)[2], atol=1e-5)


def test_gated_self_gate_film_none_and_unimodal_models():
    torch.manual_seed(0)
    model = AVClassifier(6, "gated")
    a, v = torch.randn(3, 512), torch.randn(3, 512)
    u_a, u_v, z = model.head(a, v)
    assert isinstance(model.head, GatedHead) and z.shape == (3, 6)
    z_a, _ = unimodal_logits(model.head, u_a, u_v, bias="full")
    assert torch.allclose(z_a, model.head.fc_out(torch.sigmoid(u_a) * u_a))
    film = AVClassifier(6, "film")
    assert film.head(a, v)[2].shape == (3, 6)
    assert unimodal_logits(film.head, a, v, bias="half") == (None, None)  # FiLM has no unimodal logits
    with pytest.raises(ValueError, match="bias"):
        unimodal_logits(model.head, a, v, bias=None)
    concat = AVClassifier(6, "concat")
    z_a, z_v = unimodal_logits(concat.head, a, None, bias="half")  # a unimodal model's missing branch: None
    assert z_v is None and torch.allclose(z_a, a @ concat.head.fc_out.weight[:, :512].T + concat.head.fc_out.bias / 2)


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_unimodal_model_runs_one_encoder_and_feeds_the_head_zeros(modality):
    """AVClassifier(..., modality): the other encoder is frozen (no gradient, so DDP and the optimizer skip it) and
    never run; the head gets zeros for its feature, and forward returns None for it."""
    torch.manual_seed(0)
    model, joint = AVClassifier(6, "concat", modality=modality), AVClassifier(6, "concat")
    joint.load_state_dict(model.state_dict())
    audio, visual = torch.randn(2, 1, 33, 33), torch.randn(2, 3, 1, 32, 32)
    f_a, f_v, z = model(audio, visual)
    other = model.visual_net if modality == "audio" else model.audio_net
    assert not any(p.requires_grad for p in other.parameters())
    a, v = joint.audio_net(audio), joint.visual_net(visual)
    a, v = (a, torch.zeros_like(v)) if modality == "audio" else (torch.zeros_like(a), v)
    assert torch.allclose(z, joint.head(a, v)[2], atol=1e-6)
    assert (f_v is None) == (modality == "audio") and (f_a is None) == (modality == "visual")
    z.sum().backward()
    assert all(p.grad is None for p in other.parameters())


def test_average_precision_is_sklearns_and_ignores_the_order_of_tied_scores():
    """Hand-computed: scores (0.9, 0.5, 0.5, 0.1), positives at 0.9 and at one of the 0.5s. Thresholds 0.9 (P 1,
    R 1/2), 0.5 (P 2/3, R 1), 0.1 (P 1/2, R 1): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6, whichever 0.5 is the positive."""
    import numpy as np

    from common.evaluate import average_precision

    scores = np.array([0.9, 0.5, 0.5, 0.1])
    for positives in ([1, 1, 0, 0], [1, 0, 1, 0]):
        assert abs(average_precision(scores, np.array(positives, dtype=float)) - 5 / 6) < 1e-12
    # no ties: the mean precision at each positive's rank (positives at ranks 1 and 3: (1 + 2/3) / 2)
    assert abs(average_precision(np.array([0.9, 0.6, 0.5, 0.1]), np.array([1.0, 0, 1, 0])) - 5 / 6) < 1e-12
    assert abs(average_precision(np.array([0.9, 0.6, 0.5, 0.1]), np.array([0.0, 1, 0, 1])) - 0.5) < 1e-12
