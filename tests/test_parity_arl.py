"""Release parity of arl.py --arl-weights fixed: its training loop (run in float64 on given batches,
tests/release_parity.py) against the training step of shicaiwei123/ICCV2025-ARL, re-expressed below line by line, on
the same initial model and batches.

The release: main_arl_variance.py `train_epoch` (L76-182), models/backbone.py (`GradScale` L71-86, applied to the
layer-4 map in `ResNet.forward` L305-352), models/basic_model.py (`AVClassifier_AUXI_Weight.forward` L195-215),
models/fusion_modules.py (`ConcatFusion_AUXI` L41-52); PyTorch 1.11 (README): zero_grad() zeroes the gradients.
It does not run as shipped: main() raises right after building the model (main_arl_variance.py L262), and GradScale's
backward multiplies the gradient by the tuple `ctx.saved_tensors` (L81-83: a TypeError on PyTorch 2). Repaired
(the raise removed, the tuple unpacked), it computes ARL's coefficients every step (L116-157) and never writes them
back, so GradScale keeps the weights of the warm-up, 0.5 and 0.5 (L163-164): what --arl-weights fixed trains.
The release's encoders (models/backbone.py) are ResNet18s that the project's trunks stand for; pooling and
everything after the layer-4 maps is written out here.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from release_parity import TOL, float64, make_batches, max_diff, moved, parity, run_script, sgd


class ReleaseGradScale(torch.autograd.Function):
    """models/backbone.py L71-86, the saved tuple unpacked."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)  # L75
        return x  # L76

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors  # L81 (the release multiplies by the tuple itself)
        return grad_output + grad_output * weight, torch.tensor(1.0)  # L83-86


def release_forward(model, spec, image, scale, weights):
    """AVClassifier_AUXI_Weight.forward (basic_model.py L195-215) with the encoders of backbone.py `ResNet.forward`
    (L305-352): GradScale on each layer-4 map when `scale` (current_epoch > start, L325 and L345)."""
    b, c, t, h, w = image.size()  # backbone.py L309
    x = image.permute(0, 2, 1, 3, 4).contiguous().view(b * t, c, h, w)  # L310-311
    v = model.visual_net.trunk(x)  # L313-323
    a = model.audio_net.trunk(spec)  # L334-343
    if scale:
        v = ReleaseGradScale.apply(v, torch.tensor(weights[1], requires_grad=False))  # L325-327
        a = ReleaseGradScale.apply(a, torch.tensor(weights[0], requires_grad=False))  # L345-347
    (_, c, h, w) = v.size()  # basic_model.py L202
    v = v.view(b, -1, c, h, w).permute(0, 2, 1, 3, 4)  # L203-205
    a = torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)  # L207, L210
    v = torch.flatten(F.adaptive_avg_pool3d(v, 1), 1)  # L208, L211
    fc_out = model.head.fc_out  # fusion_modules.py L44
    out = fc_out(torch.cat((a, v), dim=1))  # L47-49
    x_out = fc_out(torch.cat((a, torch.zeros_like(v)), dim=1))  # L50
    y_out = fc_out(torch.cat((torch.zeros_like(a), v), dim=1))  # L51
    return out, x_out, y_out  # L52; basic_model.py L213-215


def release_arl(model, batches, epochs, steps, args, weights=(0.5, 0.5)):
    """main_arl_variance.py `train_epoch` (L76-182). `start` (L69, default 5: 6 warm-up epochs) is the run's
    --warmup-epochs minus 1. weights: what GradScale multiplies by after the warm-up (the release: 0.5, 0.5)."""
    model = copy.deepcopy(model)
    optimizer = sgd(model, args)  # L270-272: SGD, momentum 0.9, weight decay 1e-4
    start = args.warmup_epochs - 1
    criterion = nn.CrossEntropyLoss()  # L77
    with float64():
        for epoch in range(epochs):
            model.train()  # L85
            for spec, image, label in batches[:steps]:  # L97
                optimizer.zero_grad(set_to_none=False)  # L104 (PyTorch 1.11: zeroes the gradients)
                out, out_a, out_v = release_forward(model, spec.unsqueeze(1), image, epoch > start, weights)  # L107
                loss_v = criterion(out_v, label)  # L109
                loss_a = criterion(out_a, label)  # L110
                loss_f = criterion(out, label)  # L111
                # L116-157: the coefficients are computed and printed, never written back
                if epoch > start:  # L150 (and the previous epoch's unimodal test accuracies not both 0)
                    loss_cls = loss_f + (loss_a + loss_v) * args.gamma  # L159
                else:
                    loss_cls = loss_f + (loss_a + loss_v) * 1  # L162 (weights set to 0.5, 0.5: L163-164)
                loss_cls.backward()  # L167-169
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=40, norm_type=2)  # L171
                optimizer.step()  # L174
    return model


def test_arl_release_parity_fixed_weights(tiny_data, tmp_path):
    """--arl-weights fixed = the (repaired) release's step: a warm-up epoch (unimodal losses weighted 1, no GradScale),
    then GradScale x1.5 on both encoders and gamma 4, clipping at 40, 6 SGD steps. With other GradScale weights the
    release's step differs from it (control)."""
    batches = make_batches(3)
    got = run_script(
        "arl.py",
        tiny_data,
        tmp_path,
        batches,
        6,
        *"--epochs 2 --max-steps 3 --warmup-epochs 1 --arl-weights fixed".split(),
    )
    assert [r["train/coeff_audio"] for r in got["stats"]] == [1.0] * 3 + [1.5] * 3
    assert got["args"].gamma == 4.0 and got["args"].clip_grad == 40.0
    want = release_arl(got["init"], batches, 2, 3, got["args"])
    assert moved(want, got["init"]) > 1e-4
    assert parity(got["model"], want) < TOL
    assert max_diff(got["model"], release_arl(got["init"], batches, 2, 3, got["args"], weights=(0.8, 0.2))) > 1e-6
