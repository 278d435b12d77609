"""Release parity of ogm.py: its training loop (run in float64 on given batches, tests/release_parity.py) against the
training step of each release, re-expressed below line by line, on the same initial model and batches.

CVPR release: GeWu-Lab/OGM-GE_CVPR2022 main.py (`train_epoch`), pinned PyTorch 1.8.1 (README). T-PAMI release:
GeWu-Lab/BML_TPAMI2024 code/main.py (`train`) and code/models/Classifier.py (`Classifier.forward`), pinned torch
1.13.1 (code/requirements.txt). Both call zero_grad() with PyTorch 1.x semantics (gradients become zero tensors).
The GE noise is drawn from the generator ogm.py uses (seed + 1,000,000) instead of the global RNG, so both sides get
the same noise stream. The release's encoders (models/backbone.py, code/models/Resnet_18.py) are ResNet18s that
the project's `audio_net` / `visual_net` stand for: the encoders and their pooling are the project's, everything
after them is written out here.
"""

import argparse
import copy

import pytest
import torch
import torch.nn as nn
from release_parity import TOL, make_batches, max_diff, moved, parity, run_script, sgd

from common import distributed


def tied(scores):
    """Replaces the project's sum of the scores over processes: both scores by their mean (an exact tie)."""
    return torch.stack([scores.mean(), scores.mean()]) if torch.is_tensor(scores) else scores


def free_gradients(model):
    """Both releases' coefficients are tensors that keep the scores' graph, and so do the gradients they scale (the
    optimizer never reads it); such a gradient and its parameter keep each other alive beyond Python's garbage
    collector. The comparison needs only the parameters: drop the gradients."""
    for p in model.parameters():
        p.grad = None
    return model


def cvpr_release(model, batches, epochs, steps, args, tie=False):
    """GeWu-Lab/OGM-GE_CVPR2022 main.py, `train_epoch` (L57-161) and the model (models/basic_model.py L38-54,
    models/fusion_modules.py). tie: both scores replaced by their mean, as `tied` does for the project."""
    model = copy.deepcopy(model)
    optimizer = sgd(model, args)  # main.py L36-37 and the optimizer built in main(): SGD, momentum 0.9, wd 1e-4
    noise = torch.Generator().manual_seed(args.seed + 1_000_000)  # the global RNG in the release
    criterion = nn.CrossEntropyLoss()  # L58
    softmax = nn.Softmax(dim=1)  # L59
    relu = nn.ReLU(inplace=True)  # L60
    tanh = nn.Tanh()  # L61
    head = model.head
    for epoch in range(epochs):
        model.train()  # L63
        for spec, image, label in batches[:steps]:  # L70
            optimizer.zero_grad(set_to_none=False)  # L77 (PyTorch 1.8.1: zeroes the gradients)
            a, v = model.audio_net(spec.unsqueeze(1)), model.visual_net(image)  # L80; basic_model.py L40-52
            if args.fusion == "sum":
                out = head.fc_x(a) + head.fc_y(v)  # fusion_modules.py L12
                out_v = torch.mm(v, torch.transpose(head.fc_y.weight, 0, 1)) + head.fc_y.bias  # main.py L83-84
                out_a = torch.mm(a, torch.transpose(head.fc_x.weight, 0, 1)) + head.fc_x.bias  # L85-86
            else:
                out = head.fc_out(torch.cat((a, v), dim=1))  # fusion_modules.py L22-23
                weight_size = head.fc_out.weight.size(1)  # main.py L88
                out_v = (
                    torch.mm(v, torch.transpose(head.fc_out.weight[:, weight_size // 2 :], 0, 1)) + head.fc_out.bias / 2
                )  # L89-90
                out_a = (
                    torch.mm(a, torch.transpose(head.fc_out.weight[:, : weight_size // 2], 0, 1)) + head.fc_out.bias / 2
                )  # L92-93
            loss = criterion(out, label)  # L95
            loss.backward()  # L98
            score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])  # L105
            score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])  # L106
            if tie:
                score_a = score_v = (score_a + score_v) / 2
            ratio_v = score_v / score_a  # L108
            ratio_a = 1 / ratio_v  # L109
            if ratio_v > 1:  # L119-124
                coeff_v = 1 - tanh(args.alpha * relu(ratio_v))
                coeff_a = 1
            else:
                coeff_a = 1 - tanh(args.alpha * relu(ratio_a))
                coeff_v = 1
            if args.modulation_starts <= epoch <= args.modulation_ends:  # L132
                for name, parms in model.named_parameters():  # L133
                    layer = str(name).split(".")[0]  # L134 ([1] there: nn.DataParallel prefixes "module.")
                    for modality, coeff in (("audio", coeff_a), ("visual", coeff_v)):  # L136-148, audio first
                        if modality in layer and len(parms.grad.size()) == 4:
                            if args.modulation == "ogm_ge":  # L137-139 / L144-146
                                parms.grad = parms.grad * coeff + torch.zeros_like(parms.grad).normal_(
                                    0, parms.grad.std().item() + 1e-8, generator=noise
                                )
                            elif args.modulation == "ogm":  # L140-141 / L147-148
                                parms.grad *= coeff
            optimizer.step()  # L153
    return free_gradients(model)


def tpami_release(model, batches, epochs, steps, args, tie=False):
    """GeWu-Lab/BML_TPAMI2024 code/main.py, `train` (L77-176), with code/models/Classifier.py `Classifier.forward`
    (L93-153) without adam-drop. Its warm-up `epoch <= 5` (main.py L91) is the project's --warmup-epochs 6; the
    constant here is the run's (--warmup-epochs minus 1)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)  # main.py L267
    noise = torch.Generator().manual_seed(args.seed + 1_000_000)  # the global RNG in the release
    loss_fn = nn.CrossEntropyLoss()  # main.py L78
    relu = nn.ReLU(inplace=True)  # L79
    tanh = nn.Tanh()  # L80
    softmax = nn.Softmax(dim=1)  # Classifier.py L86
    fxy = model.head.fc_out  # fusion_model.py L20 (ConcatFusion.fxy)
    for epoch in range(epochs):
        model.train()  # main.py L81
        for spec, image, label in batches[:steps]:  # L86
            optimizer.zero_grad(set_to_none=False)  # L90 (torch 1.13.1: zeroes the gradients)
            warm_up = 1 if epoch <= args.warmup_epochs - 1 else 0  # L91 (`epoch<=5`)
            out_1, out_2 = model.audio_net(spec.unsqueeze(1)), model.visual_net(image)  # Classifier.py L94-106
            w = fxy.weight.clone().detach()  # L112
            b = fxy.bias.clone().detach()  # L113
            t1_bias, t2_bias = b / 2, b / 2  # L125, L137
            t1 = torch.mm(out_1, torch.transpose(w[:, :512], 0, 1)) + t1_bias  # L139
            t2 = torch.mm(out_2, torch.transpose(w[:, 512:], 0, 1)) + t2_bias  # L140
            performance_1 = sum([softmax(t1)[i][int(label[i].item())] for i in range(t1.shape[0])])  # L142
            performance_2 = sum([softmax(t2)[i][int(label[i].item())] for i in range(t2.shape[0])])  # L143
            if tie:
                performance_1 = performance_2 = (performance_1 + performance_2) / 2
            out = fxy(torch.cat([out_1, out_2], dim=1))  # Classifier.py L152; fusion_model.py L23-24
            loss = loss_fn(out, label)  # main.py L104
            loss.backward()  # L114
            if warm_up == 0:  # L116 (--use_modulation)
                radio_1 = performance_1 / performance_2  # L119
                radio_2 = performance_2 / performance_1  # L120
                if radio_1 > 1:  # L138-148 (use_OGM_plus off)
                    coeff_1 = 1 - tanh(args.alpha * relu(radio_1))
                    coeff_2 = 1
                else:
                    coeff_1 = 1
                    coeff_2 = 1 - tanh(args.alpha * relu(radio_2))
                if args.modulation_starts <= epoch <= args.modulation_ends:  # L154
                    for name, parms in model.named_parameters():  # L155
                        layer_name = str(name).split(".")[0]  # L156
                        # L157-169: 'encoder_1' / 'encoder_2' there are audio_net / visual_net here
                        for encoder, coeff in (("audio_net", coeff_1), ("visual_net", coeff_2)):
                            if encoder in layer_name and parms.grad is not None and len(parms.grad.size()) == 4:
                                if args.modulation == "ogm_ge":
                                    parms.grad = parms.grad * coeff + torch.zeros_like(parms.grad).normal_(
                                        0, parms.grad.std().item() + 1e-8, generator=noise
                                    )
                                elif args.modulation == "ogm":
                                    parms.grad *= coeff
            optimizer.step()  # L171
    return free_gradients(model)


CVPR_CASES = {  # (modulation, alpha, fusion)
    "ogm-alpha0.8": ("ogm", 0.8, "concat"),
    "ogm_ge-alpha0.8": ("ogm_ge", 0.8, "concat"),
    "ogm-alpha0.1": ("ogm", 0.1, "concat"),
    "ogm_ge-alpha0.1": ("ogm_ge", 0.1, "concat"),
    "ogm_ge-sum": ("ogm_ge", 0.8, "sum"),
}


@pytest.mark.parametrize("case", CVPR_CASES)
def test_ogm_release_parity_cvpr(tiny_data, tmp_path, case):
    """The default preset (cvpr) = the CVPR release's step, 3 SGD steps, with and without GE, alpha 0.8 and 0.1."""
    modulation, alpha, fusion = CVPR_CASES[case]
    batches = make_batches(3, audio_signal=0.0)
    got = run_script(
        "ogm.py",
        tiny_data,
        tmp_path,
        batches,
        3,
        *"--epochs 1 --modulation".split(),
        modulation,
        "--alpha",
        alpha,
        "--fusion",
        fusion,
    )
    assert {r["train/modulated_audio_frac"] for r in got["stats"]} == {0.0, 1.0}  # each side modulated in a step
    want = cvpr_release(got["init"], batches, 1, 3, got["args"])
    assert moved(want, got["init"]) > 1e-4
    assert parity(got["model"], want) < TOL


@pytest.mark.parametrize("preset", ["cvpr", "tpami"])
def test_ogm_release_parity_tie(tiny_data, tmp_path, preset):
    """An exact score tie at every step (both summed scores replaced by their mean, on both sides): the CVPR release
    modulates audio, the T-PAMI release visual, and so do the presets. The other release's rule differs (control)."""
    batches = make_batches(3)
    flags = ["--epochs", 1, "--preset", preset, "--modulation", "ogm", "--alpha", 0.8, "--warmup-epochs", 0]
    if preset == "tpami":
        flags += ["--optimizer", "adamw", "--lr", 5e-5]
    got = run_script("ogm.py", tiny_data, tmp_path, batches, 3, *flags, patches=[(distributed, "all_reduce_sum", tied)])
    audio = preset == "cvpr"
    assert all(r["train/ratio"] == 1.0 and r["train/modulated_audio_frac"] == float(audio) for r in got["stats"])
    assert all((r["train/coeff_audio"] < 1) == audio and (r["train/coeff_visual"] < 1) != audio for r in got["stats"])
    if preset == "cvpr":
        want = cvpr_release(got["init"], batches, 1, 3, got["args"], tie=True)
        other = tpami_release(got["init"], batches, 1, 3, got["args"], tie=True)  # visual, and AdamW
    else:
        want = tpami_release(got["init"], batches, 1, 3, got["args"], tie=True)
        other = cvpr_release(got["init"], batches, 1, 3, got["args"], tie=True)  # audio, and SGD
    assert parity(got["model"], want) < TOL
    assert max_diff(got["model"], other) > 1e-6


@pytest.mark.parametrize("modulation", ["ogm", "ogm_ge"])
def test_ogm_release_parity_tpami(tiny_data, tmp_path, modulation):
    """--preset tpami = the T-PAMI release's step: a warm-up epoch of plain joint training, then a modulated one,
    4 steps of AdamW at the release's KS learning rate 5e-5 (code/main.py L267, code/config.py L26). (AdamW divides by
    sqrt(v) + 1e-8, so a gradient element near 1e-8 turns a last-bit difference into up to lr / 1e-8 times it: at a
    learning rate of 1e-3 the two sides differ by 7e-12, at 5e-5 by 2e-14.)"""
    batches = make_batches(2)
    got = run_script(
        "ogm.py",
        tiny_data,
        tmp_path,
        batches,
        4,
        *"--preset tpami --epochs 2 --max-steps 2 --modulation".split(),
        modulation,
        *"--optimizer adamw --lr 5e-5".split(),
    )
    assert [r["train/coeff_audio"] * r["train/coeff_visual"] < 1 for r in got["stats"]] == [False] * 2 + [True] * 2
    want = tpami_release(got["init"], batches, 2, 2, got["args"])
    assert moved(want, got["init"]) > 1e-5
    assert parity(got["model"], want) < TOL
    plain = tpami_release(got["init"], batches, 2, 2, argparse.Namespace(**{**vars(got["args"]), "modulation": "none"}))
    assert max_diff(got["model"], plain) > 1e-7  # the modulation shows through AdamW's normalisation
