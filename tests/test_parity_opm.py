"""Release parity of opm.py: its training loop (run in float64 on given batches, tests/release_parity.py) against the
OPM ("adam-drop") training step of GeWu-Lab/BML_TPAMI2024, re-expressed below line by line, on the same initial
model, batches and random draws.

The release: code/main.py `train` (L77-176) with --use_adam_drop, code/models/Classifier.py (`custom_autograd`
L9-21, `Modality_drop.execute_drop` L31-55, `calcu_q` L58-72, `Classifier.forward` L93-153); torch 1.13.1
(code/requirements.txt): zero_grad() zeroes the gradients. As shipped, Classifier.py does not import: L53 ends in a
stray `]` (a SyntaxError); the transcription is of the file without it.

Its custom autograd function divides the features by 1 - theta in the forward pass and the gradient likewise in the
backward pass, and returns theta itself as theta's gradient (L21). theta = mean(q) keeps the graph of the scores,
which are computed from the live pooled features (only W and b are detached, L112-113), so on every executed drop
the encoders get the extra gradient theta * d(theta) = d(theta^2 / 2). opm.py adds it with --release-theta-grad;
its default (no gradient through theta) is the same step with theta entering the function detached.

Random draws: the release draws whether to drop with numpy (L34) and the masks as one Bernoulli sample of shape
(B, 1, 2) (L45); opm.py draws both from a generator of its own. The transcription takes the project's draws
(whether each step dropped, from the logged train/drop_exec_frac; the masks, recorded from torch.bernoulli) and lays
the masks out as the release's sample.
"""

import copy

import torch
import torch.nn as nn
from release_parity import TOL, float64, make_batches, max_diff, moved, parity, run_script

LR = 5e-5  # the release's learning rate (code/config.py L26), AdamW (code/main.py L267)


class ReleaseDrop(torch.autograd.Function):
    """Classifier.py L9-21, `custom_autograd`."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.save_for_backward(x, theta)  # L13
        return x / (1 - theta.item())  # L14

    @staticmethod
    def backward(ctx, grad_output):
        _, theta = ctx.saved_tensors  # L18
        return 1 / (1 - theta.item()) * grad_output.clone(), theta  # L19, L21: theta as theta's own gradient


def calcu_q(performance_1, performance_2, q_base, lam):
    """Classifier.py L58-72."""
    q = torch.tensor([0.0, 0.0])  # L59
    relu = nn.ReLU(inplace=True)  # L60
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))  # L61
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))  # L62
    q[0] = q_base * (1 + lam * ratio_1) if ratio_1 > 0 else 0  # L67
    q[1] = q_base * (1 + lam * ratio_2) if ratio_2 > 0 else 0  # L68
    return torch.clip(q, 0.0, 1.0)  # L70


def execute_drop(features, q, executed, keep, theta_grad):
    """Classifier.py L31-55 (Modality_drop, dim_list [512, 512]: code/config.py L41), with this step's draws from the
    project: `executed` (L34) and `keep` = (keep_a, keep_v) (L45). theta_grad=False: theta enters detached."""
    b, d = features[0].shape  # L32-33
    if not executed:  # L34-36
        return features, torch.ones([b], dtype=torch.int32)
    dim_list = torch.tensor([512, 512])  # Classifier.py L90
    num_mod = len(features)  # L38
    d_sum = sum(dim_list)  # L39
    q_sum = sum(dim_list * q)  # L40
    theta = q_sum / d_sum  # L41
    sample = torch.stack(keep, 1)[:, None, :]  # what Bernoulli(1 - q).sample([B, 1]) returns at L45: (B, 1, 2)
    mask = sample.permute(2, 1, 0).contiguous().reshape(num_mod, b, -1)  # L45: (2, B, 1)
    stacked = torch.mul(torch.stack(features, dim=0), mask)  # L47-48
    stacked = ReleaseDrop.apply(stacked, theta if theta_grad else theta.detach())  # L49
    mask = torch.transpose(mask, 0, 1).squeeze(-1)  # L50
    update_flag = torch.sum(mask, dim=1) > 0  # L51
    cleaned = torch.masked_select(stacked, update_flag.unsqueeze(-1)).reshape(num_mod, -1, d)  # L52
    cleaned = torch.chunk(cleaned, num_mod, dim=0)  # L53, without its stray `]`
    return [c.squeeze(0) for c in cleaned], update_flag  # L54-55


def release_opm(model, batches, epochs, steps, args, executed, masks, theta_grad=True):
    """code/main.py `train` (L77-176) with --use_adam_drop and Classifier.forward (L93-153). `executed`: one flag per
    step (warm-up steps included), `masks`: (keep_a, keep_v) per executed step."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)  # main.py L267
    loss_fn = nn.CrossEntropyLoss()  # main.py L78
    softmax = nn.Softmax(dim=1)  # Classifier.py L86
    fxy = model.head.fc_out  # Classifier.py L87; fusion_model.py L20
    draws, masks = iter(executed), iter(masks)
    with float64():
        for epoch in range(epochs):
            model.train()  # main.py L81
            for spec, image, label in batches[:steps]:  # L86
                optimizer.zero_grad(set_to_none=False)  # L90 (torch 1.13.1: zeroes the gradients)
                warm_up = 1 if epoch <= args.warmup_epochs - 1 else 0  # L91 (`epoch<=5`: 6 warm-up epochs)
                out_1, out_2 = model.audio_net(spec.unsqueeze(1)), model.visual_net(image)  # Classifier.py L94-106
                w = fxy.weight.clone().detach()  # L112
                b = fxy.bias.clone().detach()  # L113
                t1 = torch.mm(out_1, torch.transpose(w[:, :512], 0, 1)) + b / 2  # L125, L139
                t2 = torch.mm(out_2, torch.transpose(w[:, 512:], 0, 1)) + b / 2  # L137, L140
                performance_1 = sum([softmax(t1)[i][int(label[i].item())] for i in range(t1.shape[0])])  # L142
                performance_2 = sum([softmax(t2)[i][int(label[i].item())] for i in range(t2.shape[0])])  # L143
                step_executed = next(draws)
                if warm_up == 0:  # L145
                    q = calcu_q(performance_1, performance_2, args.q_base, args.lam)  # L146
                    keep = next(masks) if step_executed else None
                    cleaned, update_flag = execute_drop([out_1, out_2], q, step_executed, keep, theta_grad)  # L147
                    out = fxy(torch.cat([cleaned[0], cleaned[1]], dim=1))  # L148; fusion_model.py L23-24
                    if torch.sum(update_flag, dim=0) == 0:  # main.py L95-97
                        continue
                    label = label[update_flag != 0]  # L98-99
                else:
                    out = fxy(torch.cat([out_1, out_2], dim=1))  # Classifier.py L152
                loss = loss_fn(out, label)  # main.py L104
                loss.backward()  # L114
                optimizer.step()  # L171
    return model


def project_run(tiny_data, tmp_path, *flags):
    """opm.py for 2 epochs of 3 steps (epoch 0 the warm-up), AdamW at the release's LR, the drop executed with
    probability 0.5; returns the run, each step's executed flag and the masks of the executed steps."""
    batches, drawn = make_batches(3), []
    real = torch.bernoulli

    def bernoulli(p, *a, **kw):  # opm.py's feature_masks: audio's B draws, then visual's
        drawn.append(real(p, *a, **kw))
        return drawn[-1]

    got = run_script(
        "opm.py",
        tiny_data,
        tmp_path,
        batches,
        6,
        *"--epochs 2 --max-steps 3 --warmup-epochs 1 --p-exe 0.5 --optimizer adamw --lr".split(),
        LR,
        *flags,
        patches=[(torch, "bernoulli", bernoulli)],
    )
    executed = [r["train/drop_exec_frac"] == 1.0 for r in got["stats"]]
    assert executed[:3] == [False] * 3 and True in executed[3:] and False in executed[3:]  # both kinds of OPM step
    assert all(max(r["train/coeff_audio"], r["train/coeff_visual"]) > 0 for r in got["stats"][3:])
    assert len(drawn) == 2 * sum(executed)
    return got, batches, executed, list(zip(drawn[::2], drawn[1::2]))


def test_opm_release_parity_theta_grad(tiny_data, tmp_path):
    """--release-theta-grad = the release's step, theta's gradient included. The default differs from it (control)."""
    got, batches, executed, masks = project_run(tiny_data, tmp_path, "--release-theta-grad")
    want = release_opm(got["init"], batches, 2, 3, got["args"], executed, masks)
    assert moved(want, got["init"]) > 1e-5
    assert parity(got["model"], want) < TOL
    without = release_opm(got["init"], batches, 2, 3, got["args"], executed, masks, theta_grad=False)
    assert max_diff(got["model"], without) > 1e-9


def test_opm_release_parity_no_theta_grad(tiny_data, tmp_path):
    """The default = the release's step with theta entering its autograd function detached (no gradient through the
    scores); the release as written differs from it (control)."""
    got, batches, executed, masks = project_run(tiny_data, tmp_path)
    want = release_opm(got["init"], batches, 2, 3, got["args"], executed, masks, theta_grad=False)
    assert moved(want, got["init"]) > 1e-5
    assert parity(got["model"], want) < TOL
    literal = release_opm(got["init"], batches, 2, 3, got["args"], executed, masks)
    assert max_diff(got["model"], literal) > 1e-9


def test_opm_release_theta_term_is_the_releases_extra_gradient():
    """One step on one batch, the gradient only: the release's backward (theta as theta's gradient) minus the same
    backward with theta detached equals the gradient of opm.theta_loss of the same logits (theta^2 / 2), and reaches
    only what the scores depend on (here the features)."""
    import opm

    g = torch.Generator().manual_seed(0)
    with float64():
        a, v = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
        w, b, y = torch.randn(3, 16, generator=g), torch.randn(3, generator=g), torch.arange(6) % 3
        keep = (torch.tensor([1.0, 0, 1, 1, 0, 1]), torch.ones(6))
        grads = {}
        for theta_grad in (True, False):
            z_a, z_v = a @ w[:, :8].T + b / 2, v @ w[:, 8:].T + b / 2
            s = [torch.softmax(z, 1).gather(1, y[:, None]).sum() for z in (z_a, z_v)]
            q = calcu_q(s[0], s[1], 0.5, 0.5)
            assert (q > 0).sum() == 1  # the dominant side only
            (f_a, f_v), _ = execute_drop([a, v], q, True, keep, theta_grad)
            loss = nn.functional.cross_entropy(torch.cat([f_a, f_v], 1) @ w.T + b, y)
            grads[theta_grad] = torch.autograd.grad(loss, (a, v))
        z_a, z_v = a @ w[:, :8].T + b / 2, v @ w[:, 8:].T + b / 2
        extra = torch.autograd.grad(opm.theta_loss(z_a, z_v, y, 0.5, 0.5), (a, v))
        for with_theta, without, term in zip(grads[True], grads[False], extra):
            assert term.abs().max() > 1e-3
            torch.testing.assert_close(with_theta - without, term, rtol=0, atol=1e-14)
