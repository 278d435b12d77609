"""Release parity of aug.py: its training loop (run in float64 on given batches, tests/release_parity.py) against the
training step of njustkmg/NeurIPS25-AUG, re-expressed below line by line, on the same initial model and batches,
under both zero_grad semantics: PyTorch 1.11's (the version the release pins, README: zero_grad() turns gradients
into zero tensors; aug.py's default, --zero-grad pytorch1) and PyTorch 2's (it deletes them; --zero-grad pytorch2).

The release: train_CREMAD.py (`train_audio_video` L33-105, the epoch loop and adaptive classifier assignment
L199-228), model/AudioVideo.py (`AVGBShareClassifier` L40-104; `add_layer` L67-74 appends a layer that is never
given to the optimizer). Its roles map onto aug.py's AUGClassifier: `embedding_a` / `embedding_v` (a Linear and a
ReLU) = `audio_classifiers[0]` / `visual_classifiers[0]` and the ReLU, `additional_layers_a` / `_v` = the
classifiers after the first, `fc_out` = `head`; its encoders (model/Resnet.py) are ResNet18s that the project's
`audio_net` / `visual_net` stand for. The release's labels are one-hot float targets; the added layers' initial values
(drawn from the global RNG in both) are taken from the project's run, which never trains them either.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from release_parity import TOL, C, float64, make_batches, max_diff, moved, parity, run_script, sgd


def classfier(model, x, modality):
    """model/AudioVideo.py L75-104 (`classfier`): (feature, o_fea, add_fea)."""
    first, added = model.classifiers(modality)[0], model.classifiers(modality)[1:]
    feature = model.head(F.relu(first(x)))  # L77-78 (embedding: Linear + ReLU, L47-54)
    o_fea, add_fea = feature, None  # L79-80
    i, layerlen = 0, len(added)  # L81-82
    for layer in added:  # L83
        addf = F.relu(layer(x))  # L84
        add_fea = model.head(addf)  # L85
        feature = feature + add_fea  # L86
        i = i + 1  # L87
        if i < layerlen:  # L88-89
            o_fea = feature
    return feature, o_fea, add_fea  # L104


def release_aug(model, batches, epochs, steps, args, added, zero_grad="pytorch1", delete_grads=True):
    """train_CREMAD.py L199-228 and `train_audio_video` (L33-105). added: the project's added layers, in order, per
    modality (their initial values). zero_grad: "pytorch1" (zero tensors) or "pytorch2" (None). delete_grads=False:
    without the release's final `del p.grad` (L87-89)."""
    model = copy.deepcopy(model)
    added = {m: [copy.deepcopy(layer) for layer in layers] for m, layers in added.items()}
    optimizer = sgd(model, args)  # L201 (data/crema.json: momentum 0.9, wc 1e-4)
    check = int(epochs / 10) if epochs > 10 else 1  # L205-208
    criterion = nn.CrossEntropyLoss(reduction="none")  # L39

    def zero():  # optimizer.zero_grad() on the pinned PyTorch 1.11 (zeroes) or on PyTorch 2 (deletes)
        optimizer.zero_grad(set_to_none=zero_grad == "pytorch2")

    def loss_of(out, o_fea, add_fea, y):  # L53-57 (audio), L66-70 (visual)
        if add_fea is None:
            return criterion(out, y).mean()
        kl = y * o_fea.detach().softmax(1)
        return (
            criterion(out, y).mean()
            + criterion(o_fea, y).mean()
            + criterion(add_fea, y).mean()
            - 0.5 * criterion(add_fea, kl).mean()
        )

    with float64():
        for epoch in range(epochs):  # L210 (the StepLR of L202, stepped at L212, acts at epoch 70)
            model.train()  # L34
            score_v, score_a = 0.0, 0.0  # L40-41
            for spectrogram, image, label in batches[:steps]:  # L42
                y = F.one_hot(label, C).to(torch.float64)  # one-hot float targets (dataset/CREMA.py)
                zero()  # L47
                o_a = model.audio_net(spectrogram.unsqueeze(1))  # L49 (AudioVideo.py L18-22)
                o_v = model.visual_net(image)  # L50 (AudioVideo.py L30-38)
                out_a, o_fea, add_fea = classfier(model, o_a, "audio")  # L52
                loss_a = loss_of(out_a, o_fea, add_fea, y)
                loss_a.backward()  # L59
                optimizer.step()  # L61
                zero()  # L62
                out_v, o_fea, add_fea = classfier(model, o_v, "visual")  # L65
                loss_v = loss_of(out_v, o_fea, add_fea, y)
                loss_v.backward()  # L72
                optimizer.step()  # L74
                zero()  # L75
                tmp_v = sum([F.softmax(out_v, 1)[i][torch.argmax(y[i])] for i in range(out_v.size(0))])  # L82
                tmp_a = sum([F.softmax(out_a, 1)[i][torch.argmax(y[i])] for i in range(out_a.size(0))])  # L83
                score_v += tmp_v  # L85
                score_a += tmp_a  # L86
                if delete_grads:
                    for _, p in model.named_parameters():  # L87-89
                        if p.grad is not None:
                            del p.grad
            ratio_a = score_a / score_v  # L96
            # L220 (the release also adds a layer after the last epoch, which is never used: left out)
            if ((epoch + 1) % check == 0 or epoch == 0) and epoch + 1 < epochs:
                if ratio_a > args.aca_sigma + 0.01:  # L222-224 (`args.lam` there, default 1.0)
                    model.classifiers("visual").append(added["visual"].pop(0))  # add_layer(is_a=False)
                elif ratio_a < args.aca_sigma - 0.01:  # L225-228
                    model.classifiers("audio").append(added["audio"].pop(0))  # add_layer(is_a=True)
    assert not added["audio"] and not added["visual"]  # the same additions as the project
    return model


def project_run(tiny_data, tmp_path, *flags):
    """aug.py for 3 epochs of one batch (two optimizer steps each); --aca-sigma 10 makes ACA add an audio classifier
    after epochs 0 and 1 (audio's confidence is below 10 times visual's), so the last batch trains with three audio
    classifiers, two of them outside the optimizer."""
    batches = make_batches(1)
    got = run_script(
        "aug.py", tiny_data, tmp_path, batches, 3, *"--epochs 3 --max-steps 1 --aca-sigma 10".split(), *flags
    )
    model = got["model"]
    assert [r["train/coeff_audio"] for r in got["stats"]] == [1.0, 2.0, 3.0]
    added = {m: list(model.classifiers(m)[1:]) for m in ("audio", "visual")}
    assert len(added["audio"]) == 2 and not added["visual"]
    return got, batches, added


@pytest.mark.parametrize("zero_grad", ["pytorch1", "pytorch2"])
def test_aug_release_parity(tiny_data, tmp_path, zero_grad):
    """aug.py (--zero-grad pytorch1, the default, and pytorch2) = the release's step under the same zero_grad
    semantics, the final `del p.grad` included, with classifiers added by ACA outside the optimizer: 3 batches, 6
    optimizer steps. The other semantics differ (control). Under PyTorch 1.11's the release's `del p.grad` matters:
    without it the next batch's audio step moves the visual encoder (zero gradients: momentum and weight decay) in
    place, after its forward pass, and the visual backward pass fails."""
    flags = () if zero_grad == "pytorch1" else ("--zero-grad", "pytorch2")
    got, batches, added = project_run(tiny_data, tmp_path, *flags)
    assert got["args"].zero_grad == zero_grad
    want = release_aug(got["init"], batches, 3, 1, got["args"], added, zero_grad)
    assert moved(want, got["init"]) > 1e-4
    assert parity(got["model"], want) < TOL
    other = "pytorch2" if zero_grad == "pytorch1" else "pytorch1"
    assert max_diff(got["model"], release_aug(got["init"], batches, 3, 1, got["args"], added, other)) > 1e-6
    if zero_grad == "pytorch1":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            release_aug(got["init"], batches, 3, 1, got["args"], added, zero_grad, delete_grads=False)
