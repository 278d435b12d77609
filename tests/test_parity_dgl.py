"""Release parity of dgl.py: its training loop (run in float64 on given batches, tests/release_parity.py) against the
training step of shicaiwei123/ICCV2025-GDL, re-expressed below line by line, on the same initial model and batches,
for the concat, sum and gated heads (gated with --gated-release-quirk: the release's detach placement) and both
--dgl-impl forms (one backward pass, the default; the release's two).

The release: main_dgl.py `train_epoch` (L69-165), models/basic_model.py (`AVClassifier_DGL.forward` L56-77 of that
class), models/fusion_modules.py (`SumFusion_DGL` L16-30, `ConcatFusion_DGL` L45-59, `GatedFusion_DGL` L213-250);
PyTorch 1.11 (README): zero_grad() zeroes the gradients. Its concat head also holds an unused `fc_auxi` layer, which
never gets a gradient (so SGD never touches it) and is left out here.
"""

import copy

import pytest
import torch
import torch.nn as nn
from release_parity import TOL, float64, make_batches, max_diff, moved, parity, run_script, sgd


def release_fusion(head, fusion, x, y):
    """The release's fusion modules: (x_out, y_out, output), i.e. the unimodal logits and the fused ones."""
    if fusion == "concat":  # fusion_modules.py L51-59
        output = torch.cat((x, y), dim=1).detach()  # L53-54
        output = head.fc_out(output)  # L56
        x_out = head.fc_out(torch.cat((x, torch.zeros_like(y)), dim=1))  # L57
        y_out = head.fc_out(torch.cat((torch.zeros_like(x), y), dim=1))  # L58
        return x_out, y_out, output
    if fusion == "sum":  # L22-30
        outx, outy = head.fc_x(x), head.fc_y(y)  # L24-25
        output = head.fc_x(x.detach()) + head.fc_y(y.detach())  # L27-29
        return outx, outy, output
    out_x, out_y = head.fc_x(x), head.fc_y(y)  # gated, x_gate: L232-233
    x_detach, y_detach = out_x.detach(), out_y.detach()  # L235-236
    output = head.fc_out(torch.mul(torch.sigmoid(x_detach), y_detach))  # L239-241
    out_x = head.fc_out(torch.mul(torch.sigmoid(out_x), out_x))  # L246-247
    out_y = head.fc_out(torch.mul(torch.sigmoid(out_y), out_y))  # L248-249
    return out_x, out_y, output


def release_dgl(model, batches, steps, args):
    """main_dgl.py `train_epoch` (L69-165) with AVClassifier_DGL.forward (basic_model.py)."""
    model = copy.deepcopy(model)
    optimizer = sgd(model, args)  # main_dgl.py L248-250: SGD, momentum 0.9, weight decay 1e-4
    criterion = nn.CrossEntropyLoss()  # L71
    with float64():
        model.train()  # L79
        for spec, image, label in batches[:steps]:  # L90
            optimizer.zero_grad(set_to_none=False)  # L97 (PyTorch 1.11: zeroes the gradients)
            a, v = model.audio_net(spec.unsqueeze(1)), model.visual_net(image)  # L100; basic_model.py L61-73
            out_a, out_v, out = release_fusion(model.head, args.fusion, a, v)  # L75-77
            loss_v = criterion(out_v, label)  # L102
            loss_a = criterion(out_a, label)  # L103
            loss_f = criterion(out, label)  # L104
            loss_unimodal = (loss_a + loss_v) * args.alpha  # L108
            loss_unimodal.backward(retain_graph=True)  # L110
            for name, parms in model.named_parameters():  # L114-119: the fusion module's gradients removed
                if str(name).split(".")[0] == "head":  # ("fusion" in the name's second part there)
                    parms.grad = None
            loss_f.backward()  # L122
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=40, norm_type=2)  # L129
            # L132-152: gradient sums printed and appended to a CSV file
            optimizer.step()  # L154
    return model


CASES = {  # fusion, flags
    "concat": ("concat", ()),
    "sum": ("sum", ()),
    "gated-quirk": ("gated", ("--gated-release-quirk",)),
}


@pytest.mark.parametrize("impl", ["single-pass", "two-pass"])
@pytest.mark.parametrize("case", CASES)
def test_dgl_release_parity(tiny_data, tmp_path, case, impl):
    """dgl.py (default alpha 4, clipping at 40) = the release's step, 3 SGD steps."""
    fusion, flags = CASES[case]
    batches = make_batches(3)
    got = run_script(
        "dgl.py", tiny_data, tmp_path, batches, 3, *"--epochs 1 --fusion".split(), fusion, "--dgl-impl", impl, *flags
    )
    assert got["args"].alpha == 4.0 and got["args"].clip_grad == 40.0
    want = release_dgl(got["init"], batches, 3, got["args"])
    assert moved(want, got["init"]) > 1e-4
    assert parity(got["model"], want) < TOL
    if fusion == "gated":  # the quirk: fc_x and fc_y never get a gradient, so they keep their initial values
        for name in ("fc_x", "fc_y"):
            assert max_diff(getattr(got["model"].head, name), getattr(got["init"].head, name)) == 0
