"""Release parity of mmpareto.py: its own training loop, run in float64 on batches this test gives, against the training
step of GeWu-Lab/MMPareto_ICML2024 (a339db3; the code is that of the first commit cc923ec), re-expressed below line by
line, on the same initial model and the same batches, over 4 SGD steps at the synthetic preset's LR 1e-2: parameters
and BatchNorm buffers agree to 1e-12. `--combine uniform` is checked against the release's uniform_baseline.py the
same way.

The release: code/MMPareto.py `train_epoch` (L59-213), code/min_norm_solvers.py (`_min_norm_element_from2` L9-30,
`_min_norm_2d` L32-58, `find_min_norm_element` L92-129), code/models/models.py (`AVClassifier` L133-184: concat
`head`, `head_audio`, `head_video` on the pooled features), code/uniform_baseline.py `train_epoch` (L62-90). It pins
no PyTorch version, so both zero_grad semantics are checked (every parameter gets a gradient at every step, so they
agree).

The script is run as `python mmpareto.py --dataset synthetic --batch-size 8 ...` in this process (tests/conftest.py
run_inproc): torch's default dtype is float64 while it runs (the model is built in float64), common.data.make_loaders
returns loaders over the test's float64 tensors (spectrograms (B, 17, 17), frames (B, 3, 1, 16, 16) taken as already
normalised), no checkpoint is written, and the run stops after the last wanted step.
"""

import copy
import re

import pytest
import release_parity
import torch
import torch.nn.functional as F
from release_parity import float64, make_batches, max_diff

C, B, TOL = 6, 8, 1e-12  # the synthetic set's classes; the batch; float64 over 4 steps
# (at LR 5e-2 the rounding differences of BatchNorm over these tiny maps grow about 50-fold a step, to 8e-11 at the
# 4th step: measured with --combine uniform, whose one backward differs from the script's three only in rounding)


def run_script(data_root, runs_dir, batches, *flags):
    """mmpareto.py's loop for len(batches) steps (one epoch) on `batches`, in float64 (tests/release_parity.py);
    returns the model when the loop starts ("init"), after the last step ("model"), the flags ("args") and each
    step's logged values ("stats")."""
    n = len(batches)
    return release_parity.run_script("mmpareto.py", data_root, runs_dir, batches, n, "--epochs", 1, *flags)


# ----------------------------------------------------------------------------------------------------------------
# the release, re-expressed
# ----------------------------------------------------------------------------------------------------------------
def release_forward(model, spec, image):
    """models.py L160-184 (CREMA-D: no permute): out = head(cat(a, v)), out_audio = head_audio(a), out_video =
    head_video(v) on the pooled features (the project's encoders pool as L171-175 do; head_video is head_visual)."""
    a, v = model.audio_net(spec.unsqueeze(1)), model.visual_net(image)  # L163-175
    return model.head.fc_out(torch.cat((a, v), 1)), model.head_audio(a), model.head_visual(v)  # L178-184


def release_min_norm(vecs):
    """min_norm_solvers.py find_min_norm_element for two lists of tensors (each list: the per-tensor gradients and
    their "concat" copy, MMPareto.py L169): the n = 2 return of L127-129."""
    dps = {}
    for i, j in ((0, 1), (0, 0), (1, 1)):  # _min_norm_2d L39-53: (i, j), then (i, i), (j, j)
        dps[i, j] = 0.0
        for k in range(len(vecs[i])):  # L43-44, L48-49, L52-53: summed over every entry, "concat" included
            dps[i, j] += torch.mul(vecs[i][k], vecs[j][k]).sum()
    v1v1, v1v2, v2v2 = dps[0, 0], dps[0, 1], dps[1, 1]
    if v1v2 >= v1v1:  # _min_norm_element_from2 L17-21
        c = 0.999
    elif v1v2 >= v2v2:  # L22-26
        c = 0.001
    else:
        c = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))  # L28
    return [c, 1 - c]  # find_min_norm_element L124-125: sol_vec[i] = c, sol_vec[j] = 1 - c


def release_mmpareto(model, batches, lr, set_to_none):
    """MMPareto.py train_epoch (L59-213) over `batches`; SGD momentum 0.9, wd 1e-4 (L296)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)  # L296
    model.train()  # L61
    audio, visual = [], []
    for name, param in model.named_parameters():  # L74-84: not 'head', then 'audio', then 'visual'
        if "head" in name:
            continue
        if "audio" in name:
            audio.append((name, param))
            continue
        if "visual" in name:
            visual.append((name, param))
    cosines = []
    with float64():
        for spec, image, label in batches:  # L88
            opt.zero_grad(set_to_none=set_to_none)  # L93
            out, out_a, out_v = release_forward(model, spec, image)  # L97
            losses = [F.cross_entropy(out, label), F.cross_entropy(out_a, label), F.cross_entropy(out_v, label)]
            grads_audio, grads_visual = {}, {}  # L99-114
            for loss, kind in zip(losses, ("both", "audio", "visual")):  # L117-118
                loss.backward(retain_graph=True)  # L119
                if kind in ("both", "visual"):  # L121-126 (visual), L141-145 (both)
                    grads_visual[kind] = {n: p.grad.data.clone() for n, p in visual}
                    grads_visual[kind]["concat"] = torch.cat([grads_visual[kind][n].flatten() for n, _ in visual])
                if kind in ("both", "audio"):  # L128-133 (audio), L136-140 (both)
                    grads_audio[kind] = {n: p.grad.data.clone() for n, p in audio}
                    grads_audio[kind]["concat"] = torch.cat([grads_audio[kind][n].flatten() for n, _ in audio])
                opt.zero_grad(set_to_none=set_to_none)  # L147
            cos_a = F.cosine_similarity(grads_audio["both"]["concat"], grads_audio["audio"]["concat"], dim=0)  # L149
            cos_v = F.cosine_similarity(grads_visual["both"]["concat"], grads_visual["visual"]["concat"], dim=0)
            cosines += [float(cos_a), float(cos_v)]  # L150
            # L165-174: [0.5, 0.5] when cos > 0, else the solver on [both, unimodal] lists (values incl. "concat")
            if cos_a > 0:
                audio_k = [0.5, 0.5]
            else:
                audio_k = release_min_norm([list(grads_audio[t].values()) for t in ("both", "audio")])
            if cos_v > 0:
                visual_k = [0.5, 0.5]
            else:
                visual_k = release_min_norm([list(grads_visual[t].values()) for t in ("both", "visual")])
            gamma = 1.5  # L178
            (losses[0] + losses[1] + losses[2]).backward()  # L180-181
            for name, param in model.named_parameters():  # L184-207
                if param.grad is None:
                    continue
                layer = re.split("[_.]", str(name))  # L186
                if "head" in layer:  # L187-188
                    continue
                for mod, k, rec in (("audio", audio_k, grads_audio), ("visual", visual_k, grads_visual)):
                    if mod in layer:  # L189 / L199
                        three_norm = torch.norm(param.grad.data.clone())  # L190
                        new_grad = 2 * k[0] * rec["both"][name] + 2 * k[1] * rec[mod][name]  # L191
                        diff = three_norm / torch.norm(new_grad)  # L192-193
                        param.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma  # L194-197
            opt.step()  # L209
    return model, cosines


def release_uniform(model, batches, lr):
    """uniform_baseline.py train_epoch (L62-90): backward of the sum of the three losses, one step."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    with float64():
        for spec, image, label in batches:  # L62
            opt.zero_grad()  # L65
            out, out_a, out_v = release_forward(model, spec, image)  # L69
            loss = F.cross_entropy(out, label) + F.cross_entropy(out_a, label) + F.cross_entropy(out_v, label)  # L71-79
            loss.backward()  # L82
            opt.step()  # L85
    return model


# ----------------------------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad_none", "zero_grad_zeros"])
def test_mmpareto_release_parity(tiny_data, tmp_path, set_to_none):
    """mmpareto.py (defaults: gamma 1.5, per-tensor rescale, --init release) = MMPareto.py's step, 4 SGD steps in
    float64, both branches (no conflict and conflict) taken."""
    batches = make_batches(4, seed=1)
    got = run_script(tiny_data, tmp_path, batches)
    want, cosines = release_mmpareto(got["init"], batches, got["args"].lr, set_to_none)
    diff = max_diff(got["model"], want)
    assert diff <= TOL, diff
    assert max_diff(got["init"], want) > 1e-3  # the steps moved the parameters
    logged = [s[f"train/cos_{m}"] for s in got["stats"] for m in ("audio", "visual")]
    assert logged == pytest.approx(cosines, rel=1e-9, abs=1e-12)
    assert min(cosines) <= 0 < max(cosines)  # both branches of L165-174 were exercised
    assert got["args"].lr == 1e-2 and [s["train/conflict_frac_audio"] for s in got["stats"]] == [1.0, 0.0, 1.0, 0.0]


def test_uniform_ablation_is_the_release_uniform_baseline(tiny_data, tmp_path):
    """--combine uniform = uniform_baseline.py (the sum of the three losses, one backward), 4 SGD steps."""
    batches = make_batches(4, seed=1)
    got = run_script(tiny_data, tmp_path, batches, "--combine", "uniform")
    want = release_uniform(got["init"], batches, got["args"].lr)
    diff = max_diff(got["model"], want)
    assert diff <= TOL, diff
    assert max_diff(got["init"], want) > 1e-3
