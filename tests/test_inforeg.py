"""InfoReg (inforeg.py, docs/inforeg.md): the properties the method must show, each by a test that can fail.

- The ALGO LOGIC BLOCK on its own (conftest.load_block: nothing but the builtins in scope): the window values of both
  variants, the coefficients, the proximal pull, the anchors, the trace estimator, the losses, the half-bias slices.
- Release parity: the script's own loop (`--variant release`, run in float64 on given batches) against a
  transcription of the release's training epoch (GeWu-Lab/InfoReg_CVPR2025 at 939b2ed, main.py, with the one fix it
  needs to run: weights without a gradient are skipped in the FIM loop), 3 epochs x 2 steps, every parameter and
  buffer to 1e-12; the same transcription against the block's loop on two foreign models (lift: a conv toy with
  BatchNorm, the MLP model of tests/mlp_toy.py with a plain nn.Linear head).
- The script: the default (the paper's InfoReg) is joint training while no window is open; the off switches are
  exact; every step's coefficient is the formula of the logged scores and windows; --amp / --channels-last gradient
  audit of the pull; resume exact; one-line errors.
- DDP (tests/inforeg_distributed_driver.py under torchrun, 2 gloo processes): the block's step on a BatchNorm-free
  model with 2 x B/2 equals 1 x B (scores summed, FIM from the averaged gradient), and the script's replicas agree.

Run: OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider tests/test_inforeg.py
"""

import copy
import glob
import json
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import HANG, ROOT, ckpt, history, load_block, read_results, run_inproc, torchrun
from mlp_toy import MLPModel, make_data, split_logits
from mmpareto_toy import TwoEncoderModel
from mmpareto_toy import batches as toy_batches  # the dominant side encodes the label, the other is noise
from release_parity import make_batches
from test_amp_gradients import train_steps
from test_cli_errors import user_error

import inforeg
from common import data, distributed, runs
from tools import trace

TINY = ("--epochs", 1, "--max-steps", 2, "--eval-max-steps", 1)


@pytest.fixture(scope="module")
def blk():
    return load_block("inforeg.py")


# ----------------------------------------------------------------------------------------------------------------
# toys: a conv + BatchNorm encoder pair named as the release names its parts, and batches with one informative side
# ----------------------------------------------------------------------------------------------------------------
# the conv toy: mmpareto_toy's model, whose two separate unimodal heads are those the release builds and never trains
# (basic_model.py L39-44); forward(x_a, x_v) -> (a, v, z, head_audio(a), head_video(v))
ConvToy = partial(TwoEncoderModel, "conv")


def mlp_batches(n, batch=16, seed=0):
    x_a, x_v, y = make_data(n * batch, seed)
    return [(x_a[i::n].double(), x_v[i::n].double(), y[i::n]) for i in range(n)]


def max_diff(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    return max((s1[k].double() - s2[k].double()).abs().max().item() for k in s1 if s1[k].is_floating_point())


def sgd(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


class Loop:
    """The script's method lines around the block (inforeg.py's loop), for any model with audio_net, visual_net and a
    concat nn.Linear `head` whose forward returns (a, v, z, ...)."""

    def __init__(self, blk, model, opt, variant="release", unimodal=None, window_k=None, window_epochs=10, **kw):
        self.blk, self.model, self.opt, self.variant = blk, model, opt, variant
        self.unimodal = (variant == "release") if unimodal is None else unimodal
        self.window_k = window_k if window_k is not None else (0.05 if variant == "release" else 0.04)
        self.window_epochs, self.kw = window_epochs, kw
        self.trace_a, self.trace_v, self.log = [], [], []

    def begin_epoch(self):
        b, m = self.blk, self.model
        self.k = b.window_value(self.trace_a, self.window_epochs) if self.variant == "release" else None
        self.open_a = b.paper_window_open(self.trace_a, self.window_k) if self.k is None else self.k > self.window_k
        self.open_v = b.paper_window_open(self.trace_v, self.window_k) if self.k is None else self.k > self.window_k
        self.enc_a, self.enc_v = list(m.audio_net.parameters()), list(m.visual_net.parameters())
        self.anchor_a, self.anchor_v = b.snapshot(self.enc_a), b.snapshot(self.enc_v)
        self.w_a, self.w_v = b.fim_weights(m.audio_net), b.fim_weights(m.visual_net)
        self.f_a, self.f_v = b.fim_zeros(self.w_a), b.fim_zeros(self.w_v)

    def step(self, x_a, x_v, y, reduce=lambda t: t, hook=None):
        b, m = self.blk, self.model
        a, v, z = m(x_a, x_v)[:3]
        z_a, z_v = split_logits(m.head, a, v, "half")
        loss, _ = b.inforeg_loss(z, z_a, z_v, y, self.unimodal)
        s = b.inforeg_scores(z_a, z_v, y, reduce)
        if self.k is not None:
            kw = {k: self.kw[k] for k in ("beta_audio", "beta_visual") if k in self.kw}
            beta_a, beta_v = b.release_coefficients(s[0], s[1], self.k, self.window_k, **kw)
        else:
            beta_a, beta_v = b.paper_coefficients(s[0] / s[2], s[1] / s[2], self.open_a, self.open_v, **self.kw)
        self.opt.zero_grad()
        loss.backward()
        if hook is not None:
            hook("before_pull")
        b.proximal_pull(self.enc_a, self.anchor_a, beta_a)
        b.proximal_pull(self.enc_v, self.anchor_v, beta_v)
        if hook is not None:
            hook("after_pull")
        b.fim_accumulate(self.f_a, self.w_a)
        b.fim_accumulate(self.f_v, self.w_v)
        self.opt.step()
        self.log.append({"beta_a": beta_a, "beta_v": beta_v, "s": s.clone()})
        return beta_a, beta_v

    def end_epoch(self):
        self.trace_a.append(self.blk.fim_trace(self.f_a))
        self.trace_v.append(self.blk.fim_trace(self.f_v))


def run_loop(blk, model, epochs, per_epoch, data_, set_traces=None, **kw):
    """`epochs` epochs of `per_epoch` steps. set_traces {epoch: (T_A list, T_V list)}: traces put in place of the
    measured ones before that epoch starts (a window the toy's own traces would not open)."""
    loop = Loop(blk, model, sgd(model), **kw)
    for e in range(epochs):
        if set_traces and e in set_traces:
            loop.trace_a, loop.trace_v = (list(t) for t in set_traces[e])
        loop.begin_epoch()
        for x in data_[e * per_epoch : (e + 1) * per_epoch]:
            loop.step(*x)
        loop.end_epoch()
    return loop


# ----------------------------------------------------------------------------------------------------------------
# the release's training epoch, transcribed (InfoReg_CVPR2025 939b2ed main.py), for any model whose forward returns
# (a, v, z, ...) with a concat nn.Linear head at model.head (the release's model.module.head) or model.head.fc_out
# ----------------------------------------------------------------------------------------------------------------
def release_epoch(model, opt, sched, batches, epoch, audio_trace_list, visual_trace_list, set_to_none=True):
    """main.py train_epoch with the fix the release needs to run: the FIM loop skips weights whose gradient is None
    (as shipped it raises TypeError at the first step on the unused heads: test_release_fim_loop_crashes_as_shipped).
    Left out: only values that are logged and cannot change the parameters (the other FIM dicts, the gradient
    averages, the confidence lists). The three logging backward passes are kept: each is followed by zero_grad."""
    head = model.head.fc_out if hasattr(model.head, "fc_out") else model.head
    if epoch == 0:  # main.py L237-238
        k = 1
    else:
        tr1 = sum(audio_trace_list[-10:]) / 10  # L240
        tr2 = sum(audio_trace_list[-11:-1]) / 10  # L241
        k = (tr1 - tr2) / tr1  # L243
    softmax, tanh = nn.Softmax(dim=1), nn.Tanh()  # L256, L258
    global_model = copy.deepcopy(model)  # L259
    fim_audio = {  # L303-307 (the accumulators of the audio encoder's Conv2d / Linear weights)
        n: torch.zeros_like(m.weight) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    fim_visual = {n: torch.zeros_like(w) for n, w in fim_audio.items() if "visual_net" in n}  # L308-310
    fim_audio = {n: w for n, w in fim_audio.items() if "audio_net" in n}
    betas = []
    for spec, image, label in batches:  # L348
        opt.zero_grad(set_to_none=set_to_none)  # L354
        a, v, out = model(spec, image)[:3]  # L359 (the release's forward: a, v, _, _, out)
        d = a.shape[1]  # 512 in the release
        out_v = torch.mm(v, torch.transpose(head.weight[:, d:], 0, 1)) + head.bias / 2  # L361
        out_a = torch.mm(a, torch.transpose(head.weight[:, :d], 0, 1)) + head.bias / 2  # L363
        loss = F.cross_entropy(out, label)  # L378
        loss_out_v = F.cross_entropy(out_v, label)  # L379
        loss_out_a = F.cross_entropy(out_a, label)  # L380
        for loss_tem in (loss, loss_out_a, loss_out_v):  # L401, L406-408: logging-only backward passes ...
            loss_tem.backward(retain_graph=True)
            opt.zero_grad(set_to_none=set_to_none)  # L453: ... each followed by zero_grad
        loss_out_v.backward(retain_graph=True)  # L456
        loss_out_a.backward(retain_graph=True)  # L457
        loss.backward()  # L458
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])  # L460
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])  # L461
        if (score_a > score_v) and k > 0.05:  # L465
            beta = 0.95 * torch.exp(tanh(score_a - score_v))  # L467-468
            beta2 = 0  # L471
        elif (score_a < score_v) and k > 0.05:  # L473
            beta2 = 0.1 * torch.exp(tanh(score_v - score_a))  # L475-476
            beta = 0  # L479
        else:  # L482-484
            beta, beta2 = 0, 0
        audio_params, visual_params = list(model.audio_net.parameters()), list(model.visual_net.parameters())
        for p, gp in zip(model.parameters(), global_model.parameters()):  # L489 (autograd on, as released)
            if p.requires_grad and any(p is q for q in audio_params):  # L491
                p.grad += beta * (p - gp)  # L492
            if p.requires_grad and any(p is q for q in visual_params):  # L494
                p.grad += beta2 * (p - gp)  # L495
        for n, m in model.named_modules():  # L507-508
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.grad is not None:  # the fix: skip None
                if "audio_net" in n and m.weight.requires_grad:  # L509
                    fim_audio[n] += m.weight.grad * m.weight.grad  # L510
                    fim_audio[n].detach_()  # L511
                elif "visual_net" in n and m.weight.requires_grad:  # L512
                    fim_visual[n] += m.weight.grad * m.weight.grad  # L513
                    fim_visual[n].detach_()  # L514
        opt.step()  # L543
        betas.append(tuple(float(x.detach()) if torch.is_tensor(x) else float(x) for x in (beta, beta2)))
    fim_trace_audio = sum(fim_audio[n].mean().item() for n in fim_audio)  # L569-572
    fim_trace_visual = sum(fim_visual[n].mean().item() for n in fim_visual)  # L574-577
    visual_trace_list.append(fim_trace_visual)  # L594
    audio_trace_list.append(fim_trace_audio)  # L595
    sched.step()  # L601
    return betas


def release_run(model, batches, epochs, per_epoch, lr, set_to_none=True):
    """main.py L693-694 (the trace lists start with ten zeros), L714-715 (SGD, StepLR(30, 0.1)), then the epochs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 30, 0.1)
    audio_trace_list, visual_trace_list = [0] * 10, [0] * 10
    betas = []
    for e in range(epochs):
        chunk = batches[e * per_epoch : (e + 1) * per_epoch]
        betas += release_epoch(model, opt, sched, chunk, e, audio_trace_list, visual_trace_list, set_to_none)
    return betas, audio_trace_list[10:], visual_trace_list[10:]


# ----------------------------------------------------------------------------------------------------------------
# the block on its own (spec page inforeg.md, section 8, numbered as there)
# ----------------------------------------------------------------------------------------------------------------
def test_block_is_self_contained(blk):
    names = {"inforeg_loss", "inforeg_scores", "paper_window_open", "paper_coefficients", "window_value"}
    names |= {"release_coefficients", "snapshot", "proximal_pull", "fim_weights", "fim_zeros", "fim_accumulate"}
    assert names | {"fim_trace"} <= set(vars(blk))
    assert not set(vars(blk)) & {"np", "runs", "distributed", "unimodal_logits", "AVClassifier", "random"}


def test_window_value(blk):
    """8.1: k_0 = 1, k_1 = 1 for T(0) > 0; (4, 1, 0.2) -> 0.2 then 0.2 / 5.2; a constant trace 1/e up to e = 10,
    then exactly 0; an all-zero history 0 (the release divides by zero); k <= 1."""
    g = torch.Generator().manual_seed(0)
    assert blk.window_value([]) == 1.0
    for _ in range(5):
        assert blk.window_value([float(torch.rand(1, generator=g)) + 0.1]) == 1.0
    assert blk.window_value([4.0, 1.0]) == pytest.approx(0.2, abs=1e-15)
    assert blk.window_value([4.0, 1.0, 0.2]) == pytest.approx(0.2 / 5.2, abs=1e-15)
    for e in range(2, 11):
        assert blk.window_value([3.0] * e) == pytest.approx(1 / e, abs=1e-15)
    assert blk.window_value([3.0] * 11) == 0.0
    assert blk.window_value([0.0] * 4) == 0.0
    for _ in range(200):
        trace = torch.rand(int(torch.randint(1, 30, (1,), generator=g)), generator=g).tolist()
        assert blk.window_value(trace) <= 1.0
    assert blk.window_value([4.0, 1.0, 0.2], length=2) == pytest.approx((0.2 - 4.0) / 1.2, abs=1e-15)


def test_window_value_is_the_release_expression(blk):
    """main.py L237-243 with the history of L693-694 / L595 (ten zeros first), evaluated literally: bitwise."""
    g = torch.Generator().manual_seed(1)
    history_ = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # L694
    for epoch in range(25):
        if epoch == 0:
            k = 1  # L237-238
        else:
            tr1 = sum(history_[-10:]) / 10  # L240
            tr2 = sum(history_[-11:-1]) / 10  # L241
            k = (tr1 - tr2) / tr1  # L243
        assert blk.window_value(history_[10:]) == k
        history_.append(float(torch.rand(1, generator=g)) * (epoch + 1))  # L595


def test_release_coefficient_values(blk):
    """8.2: 0.95 exp(tanh D) and 0.1 exp(tanh D) (the spec's table says 0.111 for the visual value at 0.1: 0.110)."""
    audio = [1.050, 1.508, 2.035, 2.491, 2.582, 2.582]
    visual = [0.110, 0.159, 0.214, 0.262, 0.272, 0.272]
    for d, ea, ev in zip([0.1, 0.5, 1, 2, 5, 50], audio, visual):
        b_a, b_v = blk.release_coefficients(10 + d, 10, 1.0)
        assert round(b_a, 3) == ea and b_v == 0.0
        b_a, b_v = blk.release_coefficients(10, 10 + d, 1.0)
        assert round(b_v, 3) == ev and b_a == 0.0


def test_release_coefficients_one_side_and_closed_window(blk):
    g = torch.Generator().manual_seed(2)
    for _ in range(100):
        s_a, s_v = (float(x) * 64 for x in torch.rand(2, generator=g))
        k = float(torch.rand(1, generator=g)) * 0.1
        b_a, b_v = blk.release_coefficients(s_a, s_v, k)
        assert b_a == 0.0 or b_v == 0.0
        if k <= 0.05:
            assert b_a == b_v == 0.0
        else:
            assert (b_a > 0) == (s_a > s_v) and (b_v > 0) == (s_v > s_a)
    assert blk.release_coefficients(7.0, 7.0, 1.0) == (0.0, 0.0)  # a tie regulates nobody
    assert blk.release_coefficients(9.0, 7.0, 0.05) == (0.0, 0.0)  # k = K is closed (strict >)
    assert blk.release_coefficients(9.0, 7.0, 0.3, 0.2, 2.0, 0.5)[0] == pytest.approx(2.0 * math.exp(math.tanh(2)))
    assert blk.release_coefficients(7.0, 9.0, 0.3, 0.2, 2.0, 0.5)[1] == pytest.approx(0.5 * math.exp(math.tanh(2)))
    assert blk.release_coefficients(7.0, 9.0, 0.3, 0.4) == (0.0, 0.0)  # K given: 0.3 <= 0.4 closed


def test_paper_window_and_coefficients(blk):
    """8.9: no window in epochs 0-1; (T(t-1) - T(t-2)) / T(t-1) > K, K 0.04 by default; alpha = exp(0.9 tanh D) at
    the spec's values; each leader gated by its own window; a tie and a trailing modality get 0."""
    assert not blk.paper_window_open([]) and not blk.paper_window_open([5.0])
    assert blk.paper_window_open([1.0, 2.0]) and not blk.paper_window_open([2.0, 2.05])  # 0.05/2.05 = 0.024
    assert blk.paper_window_open([2.0, 2.1]) and not blk.paper_window_open([2.0, 2.1], 0.05)  # 0.1/2.1 = 0.048
    assert not blk.paper_window_open([24.0, 25.0]) and blk.paper_window_open([23.99, 25.0])  # 1 / 25 = K: closed
    assert not blk.paper_window_open([1.0, 0.0]) and not blk.paper_window_open([3.0, 1.0, 0.0])
    assert blk.paper_window_open([9.0, 1.0, 2.0]) and not blk.paper_window_open([1.0, 2.0, 1.0])  # the last two
    assert blk.paper_window_open([1.0, 100.0, 104.5]) and not blk.paper_window_open([1.0, 100.0, 104.1])  # / T(t-1)
    for d, alpha in ((0.05, 1.046), (0.1, 1.094), (0.2, 1.194), (0.5, 1.516)):
        a_a, a_v = blk.paper_coefficients(0.3 + d, 0.3, True, True)
        assert round(a_a, 3) == alpha and a_v == 0.0
        a_a, a_v = blk.paper_coefficients(0.3, 0.3 + d, True, True)
        assert round(a_v, 3) == alpha and a_a == 0.0
    assert blk.paper_coefficients(0.2, 0.6, True, False) == (0.0, 0.0)  # visual leads: the visual window decides
    assert blk.paper_coefficients(0.6, 0.2, False, True) == (0.0, 0.0)
    assert blk.paper_coefficients(0.4, 0.4, True, True) == (0.0, 0.0)
    assert blk.paper_coefficients(0.6, 0.2, True, True, beta=0.5)[0] == pytest.approx(math.exp(0.5 * math.tanh(0.4)))


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_paper_variant_in_a_loop_regulates_from_epoch_2(blk, variant):
    """8.9 in a loop: the paper's variant never pulls in epochs 0-1 (K 0 here: open whenever the trace grew), the
    release's pulls from epoch 0 (k_0 = 1); in epoch 2, with both traces set growing, the paper's leader is pulled
    with alpha = exp(0.9 tanh(gap of the batch means))."""
    data_ = toy_batches(8, seed=10)
    grown = {2: ([1.0, 2.0], [1.0, 2.0])}
    loop = run_loop(blk, ConvToy(seed=10).double(), 3, 2, data_, set_traces=grown, variant=variant, window_k=0.0)
    early = [max(r["beta_a"], r["beta_v"]) for r in loop.log[:4]]
    if variant == "paper":
        assert early == [0.0] * 4
        opened = [r for r in loop.log[4:6] if max(r["beta_a"], r["beta_v"]) > 0]
        assert len(opened) == 2
        for r in opened:
            s = r["s"] / r["s"][2]
            lead = abs(float(s[0] - s[1]))
            assert max(r["beta_a"], r["beta_v"]) == pytest.approx(math.exp(0.9 * math.tanh(lead)), rel=1e-12)
    else:
        assert early[1] > 0 and early[3] > 0  # epochs 0 and 1, after each epoch's first step (theta = anchor)


def test_proximal_gradient(blk):
    """8.4: grad_after - grad_before = beta (theta - theta_bar) on every audio-encoder parameter (BatchNorm
    included), visual encoder and head unchanged; the same as adding (beta/2) ||theta - theta_bar||^2 to the loss."""
    model = ConvToy(seed=4).double()
    anchor_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x_a, x_v, y = toy_batches(1, seed=4)[0]
    enc_a = list(model.audio_net.parameters())
    anchor = blk.snapshot(list(anchor_model.audio_net.parameters()))
    a, v, z = model(x_a, x_v)[:3]
    z_a, z_v = split_logits(model.head, a, v, "half")
    loss = blk.inforeg_loss(z, z_a, z_v, y, True)[0]
    loss.backward(retain_graph=True)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    beta = 1.7
    blk.proximal_pull(enc_a, anchor, beta)
    ref = dict(anchor_model.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        if n.startswith("audio_net."):
            torch.testing.assert_close(p.grad - before[n], beta * (p - ref[n]).detach(), rtol=1e-6, atol=1e-15)
        else:
            assert torch.equal(p.grad, before[n]), n
    assert "audio_net.bn.weight" in before and "audio_net.bn.bias" in before
    pulled = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    penalty = beta / 2 * sum(((p - q) ** 2).sum() for p, q in zip(enc_a, anchor))
    (loss + penalty).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, pulled[n], rtol=1e-10, atol=1e-14)
    grads = [p.grad.clone() for p in enc_a]
    blk.proximal_pull(enc_a, anchor, 0.0)  # beta 0: nothing changes
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, enc_a))
    enc_a[0].grad = None  # a parameter without a gradient is skipped
    blk.proximal_pull(enc_a, anchor, beta)
    assert enc_a[0].grad is None


def test_anchor_timing(blk):
    """8.5: the first step of every epoch adds exactly zero; the anchor is the parameters after the previous epoch's
    last step (the initial ones at epoch 0) and does not move within the epoch."""
    model = ConvToy(seed=5).double()
    loop = Loop(blk, model, sgd(model))
    data_ = toy_batches(6, seed=5)
    previous_end = [p.detach().clone() for p in model.audio_net.parameters()]
    for e in range(3):
        loop.begin_epoch()
        assert all(torch.equal(p, q) for p, q in zip(loop.anchor_a, previous_end))
        anchor_at_start = [p.clone() for p in loop.anchor_a]
        for i, x in enumerate(data_[2 * e : 2 * e + 2]):
            grads = {}
            b_a, _ = loop.step(*x, hook=lambda when, g=grads: g.setdefault(when, [p.grad.clone() for p in loop.enc_a]))
            delta = max(float((g1 - g0).abs().max()) for g0, g1 in zip(grads["before_pull"], grads["after_pull"]))
            assert delta == 0.0 if i == 0 else (b_a > 0 and delta > 0)
        assert all(torch.equal(p, q) for p, q in zip(loop.anchor_a, anchor_at_start))
        loop.end_epoch()
        previous_end = [p.detach().clone() for p in model.audio_net.parameters()]


def test_trace_hand_set_gradients(blk):
    """8.6: T = sum over layers of mean(sum over steps of g^2); BatchNorm gradients do not count."""
    enc = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double()
    weights = blk.fim_weights(enc)
    assert [tuple(w.shape) for w in weights] == [(2, 1, 3, 3), (3, 2, 1, 1)]
    fim = blk.fim_zeros(weights)
    assert all(float(f.abs().sum()) == 0 for f in fim)
    g = torch.Generator().manual_seed(6)
    steps = [[torch.randn(w.shape, generator=g, dtype=torch.float64) for w in weights] for _ in range(3)]
    for grads in steps:
        for w, gr in zip(weights, grads):
            w.grad = gr.clone()
        for m in (enc[1], enc[3]):
            m.weight.grad = torch.full_like(m.weight, 1e6)
        blk.fim_accumulate(fim, weights)
    expected = sum(float(sum(s[i] ** 2 for s in steps).mean()) for i in range(2))
    assert blk.fim_trace(fim) == pytest.approx(expected, rel=1e-12)
    weights[0].grad = None  # skipped, not an error (the release raises TypeError)
    blk.fim_accumulate(fim, weights)
    assert blk.fim_trace(fim) > expected


def test_trace_counts_the_pulled_gradient(blk):
    """The accumulation reads the gradient after the proximal term (main.py L489-514)."""
    model = ConvToy(seed=7).double()
    loop = run_loop(blk, model, 1, 2, toy_batches(2, seed=7))
    loop.begin_epoch()
    loop.step(*toy_batches(1, seed=70)[0])
    f0 = loop.f_a[0].clone()
    grads = {}
    loop.step(*toy_batches(1, seed=71)[0], hook=lambda when: grads.setdefault(when, loop.w_a[0].grad.clone()))
    assert loop.log[-1]["beta_a"] > 0
    torch.testing.assert_close(loop.f_a[0] - f0, grads["after_pull"] ** 2, rtol=1e-12, atol=0)
    assert float((loop.f_a[0] - f0 - grads["before_pull"] ** 2).abs().max()) > 1e-9


def test_fim_weights_of_the_project_resnet18(blk):
    """The script's encoders: 20 conv kernels each, no BatchNorm tensor."""
    from common.models import AVClassifier

    model = AVClassifier(6)
    for enc in (model.audio_net, model.visual_net):
        ws = blk.fim_weights(enc)
        assert len(ws) == 20 and all(w.dim() == 4 for w in ws)


def test_loss_variants_and_scores(blk):
    """8.7: the default loss is CE(z); unimodal=True gives CE(z) + CE(z_a) + CE(z_v); the scores are the batch sums
    of the true-class probabilities with the sample count, and carry no gradient."""
    model = ConvToy(seed=8).double()
    x_a, x_v, y = toy_batches(1, seed=8)[0]
    params = [p for n, p in model.named_parameters() if not n.startswith(("head_audio", "head_video"))]
    a, v, z = model(x_a, x_v)[:3]
    z_a, z_v = split_logits(model.head, a, v, "half")
    for unimodal in (False, True):
        loss, loss_m = blk.inforeg_loss(z, z_a, z_v, y, unimodal) if unimodal else blk.inforeg_loss(z, z_a, z_v, y)
        got = torch.autograd.grad(loss, params, retain_graph=True)
        ref_loss = F.cross_entropy(z, y) + (F.cross_entropy(z_a, y) + F.cross_entropy(z_v, y) if unimodal else 0)
        ref = torch.autograd.grad(ref_loss, params, retain_graph=True)
        for g1, g2 in zip(got, ref):
            torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)
        assert float(loss_m.detach()) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-12)
    s = blk.inforeg_scores(z_a, z_v, y)
    assert not s.requires_grad and float(s[2]) == len(y)
    expected = [sum(float(torch.softmax(zz[i].detach(), 0)[y[i]]) for i in range(len(y))) for zz in (z_a, z_v)]
    assert float(s[0]) == pytest.approx(expected[0], rel=1e-12) and float(s[1]) == pytest.approx(expected[1], rel=1e-12)


def test_half_bias_slices_of_the_live_head():
    """8.8: z_a + z_v = z, with the live W and b (the script's unimodal_logits(head, a, v, "half"))."""
    from common.models import ConcatHead, unimodal_logits

    head = ConcatHead(4, dim=7).double()
    a, v = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    z_a, z_v = unimodal_logits(head, a, v, bias="half")
    torch.testing.assert_close(z_a + z_v, head(a, v)[2], rtol=0, atol=1e-12)
    w, b = head.fc_out.weight, head.fc_out.bias
    torch.testing.assert_close(z_a, a @ w[:, :7].T + b / 2)
    gw, gb = torch.autograd.grad(F.cross_entropy(z_a, torch.tensor([0, 1, 2, 3, 0])), [w, b])
    assert float(gw[:, :7].abs().max()) > 0 and float(gw[:, 7:].abs().max()) == 0 and float(gb.abs().max()) > 0


def test_smoke_audio_is_regulated_in_epoch_zero(blk):
    """8.10 (release variant): with clean audio and noisy video, audio is pulled in > 80% of epoch 0's steps."""
    model = ConvToy(seed=11)
    loop = run_loop(blk, model, 3, 30, toy_batches(90, seed=11, dtype=torch.float32))
    assert sum(r["beta_a"] > 0 for r in loop.log[:30]) > 0.8 * 30
    assert all(math.isfinite(x) for x in loop.trace_a + loop.trace_v) and len(loop.trace_a) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_presets_follow_the_release_and_the_paper():
    """main.py L39-45, L714-715, L601: SGD 2e-3, batch 64, 50 epochs, 2e-3 for epochs 0-29 then 2e-4; the paper's
    beta 0.9, K 0.04, fused loss; the release's 0.95 / 0.1, K 0.05, 10 epochs, unimodal losses."""
    for dataset in ("cremad", "ks", "vggsound"):
        args = inforeg.parse_args(["--dataset", dataset])
        assert (args.optimizer, args.lr, args.batch_size, args.epochs, args.weight_decay) == ("sgd", 2e-3, 64, 50, 1e-4)
        assert (args.variant, args.beta, args.window_k, args.unimodal_loss) == ("paper", 0.9, 0.04, "off")
        rel = inforeg.parse_args(["--dataset", dataset, "--variant", "release"])
        assert (rel.beta_audio, rel.beta_visual, rel.window_k, rel.window_epochs) == (0.95, 0.1, 0.05, 10)
        assert rel.unimodal_loss == "on" and rel.clip_grad == 0
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.lr_milestones, args.lr_gamma)
        rel_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002, momentum=0.9)
        rel_sched = torch.optim.lr_scheduler.StepLR(rel_opt, 30, 0.1)  # main.py L715
        for _ in range(args.epochs):
            assert opt.param_groups[0]["lr"] == pytest.approx(rel_opt.param_groups[0]["lr"], rel=1e-12)
            opt.step(), rel_opt.step(), sched.step(), rel_sched.step()
    syn = inforeg.parse_args(["--variant", "release"])
    assert (syn.beta_audio, syn.beta_visual, syn.window_k, syn.window_epochs, syn.unimodal_loss) == (
        0.95,
        0.1,
        0.05,
        2,
        "on",
    )
    paper = inforeg.parse_args([])
    assert (paper.beta, paper.window_k, paper.unimodal_loss) == (0.9, 0.04, "off")
    import baseline

    assert inforeg.PRESETS["synthetic"] == baseline.PRESETS["synthetic"]  # the regime study compares like with like


# ----------------------------------------------------------------------------------------------------------------
# release parity: the script itself in float64 on given batches, against the transcription
# ----------------------------------------------------------------------------------------------------------------
C, B = 6, 8  # the synthetic set's classes; the batch (BatchNorm over 8 samples stays near 1e-13 over 6 steps)


class Stop(Exception):
    pass


class EpochLoader:
    """Yields `per_epoch` of the given batches per epoch, the next ones each time it is iterated (the script reseeds
    .generator each epoch; nothing here reads it)."""

    def __init__(self, batches, per_epoch):
        self.batches, self.per_epoch, self.epoch, self.generator = batches, per_epoch, 0, torch.Generator()

    def __iter__(self):
        chunk = self.batches[self.epoch * self.per_epoch : (self.epoch + 1) * self.per_epoch]
        self.epoch += 1
        return iter(chunk)

    def __len__(self):
        return self.per_epoch


def run_script_f64(tiny_data, runs_dir, batches, epochs, per_epoch, *flags):
    """inforeg.py's own loop (runpy, in this process) in float64 on `batches`: {"init": the model before the first
    step, "model": after the last, "stats": each step's logged values, "history": the epochs' metrics}."""
    out = {"stats": []}
    real_ddp, real_log_step = distributed.ddp, runs.Run.log_step

    def make_loaders(train_set, test_set, args, generator):
        assert args.batch_size == B
        test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batches[0]), batch_size=B)
        return EpochLoader(batches, per_epoch), test

    def ddp(forward, args, *a, **kw):
        out.update(init=copy.deepcopy(forward.model), model=forward.model)
        return real_ddp(forward, args, *a, **kw)

    def log_step(self, stats, n):
        real_log_step(self, stats, n)
        out["stats"].append(dict(stats))

    dtype = torch.get_default_dtype()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "make_loaders", make_loaders)
        m.setattr(distributed, "ddp", ddp)
        m.setattr(runs.Run, "log_step", log_step)
        torch.set_default_dtype(torch.float64)
        try:
            flags = ("--batch-size", B, "--epochs", epochs, "--max-steps", per_epoch, "--no-save", *flags)
            run = run_inproc("inforeg.py", tiny_data, runs_dir, *flags)
        finally:
            torch.set_default_dtype(dtype)
    assert len(out["stats"]) == epochs * per_epoch
    assert all(p.dtype == torch.float64 for p in out["model"].parameters())
    out["history"] = history(run)
    return out


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad_none", "zero_grad_zeros"])
def test_inforeg_release_parity(tiny_data, tmp_path, set_to_none):
    """`inforeg.py --variant release --window-epochs 10` (the release's window length) and the transcription of
    main.py's epoch, from the same initial model on the same 6 batches (3 epochs x 2 steps), float64, SGD at the
    release's 2e-3 with momentum 0.9 and weight decay 1e-4, under either zero_grad semantics (the release pins no
    PyTorch version): every parameter to 1e-12, every BatchNorm buffer to 1e-12 relative (running variances reach
    ~5), the traces and every step's strengths to 1e-10 relative. The two differ only in rounding: the script sums the
    three losses before one backward pass where the release runs three, and sums the scores in another order (the
    first step's strengths, from identical weights, agree to 1e-15; rounding grows through the ResNet18s)."""
    batches = make_batches(6, seed=12)
    flags = ("--variant", "release", "--window-epochs", 10, "--lr", 0.002, "--lr-milestones", 30)
    mine = run_script_f64(tiny_data, tmp_path, batches, 3, 2, *flags)
    rel = copy.deepcopy(mine["init"])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        batches_ = [(s.unsqueeze(1), f, y) for s, f, y in batches]
        betas, trace_a, trace_v = release_run(rel, batches_, 3, 2, 0.002, set_to_none)
    finally:
        torch.set_default_dtype(default_dtype)
    got, want = dict(mine["model"].named_parameters()), dict(rel.named_parameters())
    diff = max(float((got[k] - want[k]).detach().abs().max()) for k in got)
    sa, sb = mine["model"].state_dict(), rel.state_dict()
    buffers = [k for k in sa if k not in got and sa[k].is_floating_point()]
    rel_diff = max(float(((sa[k] - sb[k]).abs() / (1 + sb[k].abs())).max()) for k in buffers)
    if os.environ.get("PARITY_LOG"):
        with open(os.environ["PARITY_LOG"], "a") as f:
            f.write(json.dumps({"test": f"inforeg[{set_to_none}]", "params": diff, "buffers_rel": rel_diff}) + "\n")
    assert diff <= 1e-12 and rel_diff <= 1e-12, (diff, rel_diff)
    assert max_diff(mine["init"], mine["model"]) > 1e-2  # the steps moved the model
    for st, (b_a, b_v) in zip(mine["stats"], betas):
        assert st["train/coeff_audio"] == pytest.approx(b_a, rel=1e-10, abs=0)
        assert st["train/coeff_visual"] == pytest.approx(b_v, rel=1e-10, abs=0)
    assert mine["stats"][0]["train/coeff_audio"] == pytest.approx(betas[0][0], rel=1e-15)
    assert sum(max(b) > 0 for b in betas) >= 5  # the pull acted at every step after the first (k_0 = 1)
    assert [h["train/fim_trace_audio"] for h in mine["history"]] == pytest.approx(trace_a, rel=1e-10)
    assert [h["train/fim_trace_visual"] for h in mine["history"]] == pytest.approx(trace_v, rel=1e-10)
    assert [h["train/window_k"] for h in mine["history"]][0] == 1.0


def test_release_fim_loop_crashes_as_shipped():
    """main.py L501-505 squares module.weight.grad of every Conv2d / Linear of the model: the unused heads
    (basic_model.py L39-44) have None there, so the release raises TypeError at its first step."""
    model = ConvToy(seed=13).double()
    x_a, x_v, y = toy_batches(1, seed=13)[0]
    F.cross_entropy(model(x_a, x_v)[2], y).backward()
    fim = {n: torch.zeros_like(m.weight) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    with pytest.raises(TypeError):
        for n, m in model.named_modules():  # L501-505
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad:
                fim[n] += m.weight.grad * m.weight.grad


# ----------------------------------------------------------------------------------------------------------------
# lift: the block's loop on foreign models against the release's epoch
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_lift_block_matches_the_release_epoch_on_a_foreign_model(blk, kind):
    """The lifted block on the conv toy (with BatchNorm and the release's unused heads) and on tests/mlp_toy.py's
    model (ReLU MLP encoders of widths 24 and 40, a plain nn.Linear head): 3 epochs x 2 steps equal the release's
    training to 1e-12 in float64, pulls and traces included."""
    if kind == "conv":
        base, data_ = ConvToy(seed=14).double(), toy_batches(6, seed=14)
    else:
        base, data_ = MLPModel(seed=14).double(), mlp_batches(6, seed=14)
    mine, rel = copy.deepcopy(base), copy.deepcopy(base)
    loop = run_loop(blk, mine, 3, 2, data_)
    betas, trace_a, trace_v = release_run(rel, data_, 3, 2, 0.05)
    assert max_diff(mine, rel) <= 1e-12 and max_diff(base, mine) > 1e-3
    assert [b for r in loop.log for b in (r["beta_a"], r["beta_v"])] == pytest.approx(
        [b for pair in betas for b in pair], rel=1e-12
    )
    assert sum(max(b) > 0 for b in betas) >= 3
    assert loop.trace_a == pytest.approx(trace_a, rel=1e-12) and loop.trace_v == pytest.approx(trace_v, rel=1e-12)
    if kind == "mlp":  # the measure reads the Linear weights of an MLP encoder
        assert [tuple(w.shape) for w in blk.fim_weights(mine.audio_net)] == [(32, 10), (24, 32)]


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("variant", ["release", "paper"])
def test_lift_pull_slows_the_leading_encoder(blk, kind, variant):
    """Over epochs of audio-led steps, the pulled audio encoder ends closer to its epoch-start anchor than without
    the pull (same model, same batches; the paper's variant from epoch 2 with K 0)."""
    base = (ConvToy(seed=15) if kind == "conv" else MLPModel(seed=15)).double()
    data_ = toy_batches(24, seed=15) if kind == "conv" else mlp_batches(24, seed=15)
    epochs = 1 if variant == "release" else 3  # the paper's variant: epochs 0-1 unregulated in both runs
    off = dict(beta_audio=0.0, beta_visual=0.0) if variant == "release" else dict(window_k=1.0)
    grown = {2: ([1.0, 2.0], [1.0, 2.0])}  # the paper's windows open in epoch 2 (K 0.04 < 1/2)
    dist, lead = {}, None
    for label, kw in (("pull", {}), ("none", off)):
        model = copy.deepcopy(base)
        loop = run_loop(blk, model, epochs, 8, data_, set_traces=grown, variant=variant, **kw)
        if label == "pull":  # the encoder pulled at more steps of the last epoch
            n_a, n_v = (sum(r[k] > 0 for r in loop.log[-8:]) for k in ("beta_a", "beta_v"))
            lead = ("enc_a", "anchor_a") if n_a > n_v else ("enc_v", "anchor_v")
            assert max(n_a, n_v) >= 4
        # the distance to the last epoch's anchor (the same in both runs: the runs differ only from that epoch on)
        params, anchor = getattr(loop, lead[0]), getattr(loop, lead[1])
        dist[label] = math.sqrt(sum(float(((p - q) ** 2).sum()) for p, q in zip(params, anchor)))
        dist[label + "_anchor"] = anchor
    assert all(torch.equal(p, q) for p, q in zip(dist["pull_anchor"], dist["none_anchor"]))
    assert dist["pull"] < dist["none"]


# ----------------------------------------------------------------------------------------------------------------
# the script
# ----------------------------------------------------------------------------------------------------------------
def traced_run(tiny_data, tmp_path, name, *flags):
    """inforeg.py in this process, traced: (run folder, per-step logged values, per-epoch metrics)."""
    with trace.tracing(str(tmp_path / "trace" / name)):
        run = run_inproc("inforeg.py", tiny_data, tmp_path / name, *flags)
    with open(tmp_path / "trace" / name / "rank0.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "step" in r]
    return run, steps, history(run)


def test_default_is_joint_training_until_a_window_opens(tiny_data, tmp_path):
    """The paper's InfoReg (the default) opens no window in epochs 0-1 and trains CE(z) only: 2 epochs end bitwise
    at baseline.py's weights; the release variant (unimodal losses, the window open from epoch 0) does not."""
    flags = ("--epochs", 2, "--max-steps", 2, "--eval-max-steps", 1)
    base = run_inproc("baseline.py", tiny_data, tmp_path / "base", *flags)
    run, steps, hist = traced_run(tiny_data, tmp_path, "paper", *flags)
    rel = run_inproc("inforeg.py", tiny_data, tmp_path / "rel", *flags, "--variant", "release")
    a, b, c = ckpt(base)["model"], ckpt(run)["model"], ckpt(rel)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(s["train/coeff_audio"] == s["train/coeff_visual"] == 0.0 for s in steps)
    assert all(s["train/window_open_audio"] == s["train/window_open_visual"] == 0.0 for s in steps)
    assert all(s["train/loss"] == s["train/loss_fused"] for s in steps)
    assert ckpt(run)["inforeg_traces"] == {
        "audio": [h["train/fim_trace_audio"] for h in hist],
        "visual": [h["train/fim_trace_visual"] for h in hist],
    }
    assert all(h["train/fim_trace_audio"] > 0 and h["train/fim_trace_visual"] > 0 for h in hist)
    assert "train/window_k" not in hist[0]


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_off_switches_are_exact_no_ops(tiny_data, tmp_path, variant):
    """8.3: --window-k 1 (no window value exceeds 1) gives bitwise the unregulated run: for the release's variant the
    run with zero strengths, for the paper's joint training (baseline.py; 5 epochs, so windows can open from epoch 2).
    Both differ from the regulated run (K 0: open whenever the trace grew)."""
    flags = ("--epochs", 5 if variant == "paper" else 1, "--max-steps", 2, "--eval-max-steps", 1)
    runs_ = {
        name: run_inproc(script, tiny_data, tmp_path / name, *flags, *extra)
        for name, script, extra in (
            ("k1", "inforeg.py", ("--variant", variant, "--window-k", 1)),
            ("on", "inforeg.py", ("--variant", variant, "--window-k", 0)),
            ("off", "inforeg.py", ("--variant", "release", "--beta-audio", 0, "--beta-visual", 0))
            if variant == "release"
            else ("off", "baseline.py", ()),
        )
    }
    k1, on, off = (ckpt(runs_[n])["model"] for n in ("k1", "on", "off"))
    assert all(torch.equal(k1[k], off[k]) for k in k1)
    assert not all(torch.equal(k1[k], on[k]) for k in k1)
    assert all(h["train/coeff_audio"] == h["train/coeff_visual"] == 0 for h in history(runs_["k1"]))
    # and the logged windows are closed: for the release's variant k = 1 at epoch 0 equals K, and its test is strict
    # (main.py L465: k > 0.05)
    assert all(h["train/window_open_audio"] == h["train/window_open_visual"] == 0 for h in history(runs_["k1"]))
    assert any(h["train/coeff_audio"] + h["train/coeff_visual"] > 0 for h in history(runs_["on"]))


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_every_step_uses_the_formula_of_its_scores_and_window(tiny_data, tmp_path, variant):
    """Each step's logged strengths are the block's formula of the step's logged scores (batch sums = mean x 4 for
    the release) and of the window the epoch's start computed from the traces logged for the epochs before; the
    paper's window is closed in epochs 0-1; something was pulled."""
    flags = ("--variant", variant, "--epochs", 5, "--max-steps", 2, "--eval-max-steps", 1, "--window-k", 0.0)
    _, steps, hist = traced_run(tiny_data, tmp_path, variant, *flags)
    blk = load_block("inforeg.py")
    t_a = [h["train/fim_trace_audio"] for h in hist]
    t_v = [h["train/fim_trace_visual"] for h in hist]
    pulled = 0
    for e in range(5):
        if variant == "release":
            k = blk.window_value(t_a[:e], 2)
            assert hist[e]["train/window_k"] == k
            want_open = (k > 0.0, k > 0.0)
        else:
            want_open = (blk.paper_window_open(t_a[:e], 0.0), blk.paper_window_open(t_v[:e], 0.0))
            assert e >= 2 or want_open == (False, False)
        for s in steps[2 * e : 2 * e + 2]:
            assert (s["train/window_open_audio"], s["train/window_open_visual"]) == want_open
            s_a, s_v = s["train/score_audio"], s["train/score_visual"]
            assert s["train/ratio"] == pytest.approx(s_a / s_v, rel=1e-6)
            if variant == "release":
                want = blk.release_coefficients(4 * s_a, 4 * s_v, k, 0.0)
            else:
                want = blk.paper_coefficients(s_a, s_v, *want_open)
            assert (s["train/coeff_audio"], s["train/coeff_visual"]) == pytest.approx(want, rel=1e-5)
            assert s["train/reg_frac_audio"] == float(want[0] > 0) and s["train/reg_frac_visual"] == float(want[1] > 0)
            pulled += max(want) > 0
    assert pulled >= 1


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_unimodal_loss_flag(tiny_data, tmp_path, variant):
    """8.7 in the script: the loss is CE(z) + CE(z_a) + CE(z_v) with the release's variant (and --unimodal-loss on),
    CE(z) with the paper's (and --unimodal-loss off)."""
    for flag in (None, "on", "off"):
        extra = ("--unimodal-loss", flag) if flag else ()
        _, steps, _ = traced_run(tiny_data, tmp_path, f"{variant}_{flag}", "--variant", variant, *TINY, *extra)
        on = flag == "on" or (flag is None and variant == "release")
        for s in steps:
            want = s["train/loss_fused"] + (s["train/loss_audio"] + s["train/loss_visual"] if on else 0)
            assert s["train/loss"] == pytest.approx(want, rel=1e-5)
            assert on or s["train/loss"] == s["train/loss_fused"]


def test_resume_is_exact(tiny_data, tmp_path):
    """Stopping after epoch 0 and resuming gives the uninterrupted run's checkpoint bitwise: the traces (the windows
    of the next epochs), the anchors (the checkpoint's weights) and the optimizer all continue."""
    flags = ("--variant", "release", "--epochs", 3, "--max-steps", 2, "--eval-max-steps", 1)
    full = run_inproc("inforeg.py", tiny_data, tmp_path / "full", *flags)
    stopped = run_inproc("inforeg.py", tiny_data, tmp_path / "stop", *flags, "--stop-after-epochs", 1)
    assert ckpt(stopped)["epoch"] == 0 and len(ckpt(stopped)["inforeg_traces"]["audio"]) == 1
    run_inproc("inforeg.py", tiny_data, tmp_path / "stop", *flags, "--resume", stopped)
    a, b = ckpt(full), ckpt(stopped)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i in a["optimizer"]["state"]:
        for k, v in a["optimizer"]["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
    assert a["inforeg_traces"] == b["inforeg_traces"] and len(a["inforeg_traces"]["visual"]) == 3
    drop = lambda h: {k: v for k, v in h.items() if not k.startswith("charts/")}  # noqa: E731
    assert [drop(h) for h in a["history"]] == [drop(h) for h in b["history"]]
    assert any(h["train/coeff_audio"] + h["train/coeff_visual"] > 0 for h in a["history"][1:])


@pytest.mark.parametrize("flags", [(), ("--amp",), ("--amp", "--channels-last")], ids=["fp32", "amp", "amp-cl"])
def test_pull_gradient_under_amp(tiny_data, tmp_path, flags):
    """The speed flags audit: at the optimizer step the pulled encoder's gradient is the unregulated one plus
    beta (theta - theta_bar) (theta_bar: the weights at the epoch's start), every other gradient unchanged; an
    epoch's first step adds nothing. The unregulated run (--beta-audio 0 --beta-visual 0) takes the same first step,
    so both runs see the same weights at step 1."""
    common_ = ("--variant", "release", "--clip-grad", "0", *flags)
    got = train_steps("inforeg.py", tiny_data, tmp_path / "pull", 2, *common_, freeze=False)
    ref = train_steps(
        "inforeg.py", tiny_data, tmp_path / "ref", 2, *common_, "--beta-audio", 0, "--beta-visual", 0, freeze=False
    )
    for n, g in ref[0]["grads"].items():
        assert torch.equal(got[0]["grads"][n], g), n  # step 0: theta = theta_bar
    assert all(torch.equal(got[1]["before"][n], p) for n, p in ref[1]["before"].items())
    beta = {"audio_net": got[1]["stats"]["train/coeff_audio"], "visual_net": got[1]["stats"]["train/coeff_visual"]}
    assert max(beta.values()) > 0 and min(beta.values()) == 0
    assert ref[1]["stats"]["train/coeff_audio"] == ref[1]["stats"]["train/coeff_visual"] == 0
    pulled = max(beta, key=beta.get)
    moved = [float((got[1]["grads"][n] - g).abs().max()) for n, g in ref[1]["grads"].items() if n.startswith(pulled)]
    assert max(moved) > 0
    for n, g in ref[1]["grads"].items():
        role = n.split(".")[0]
        want = g + beta[role] * (got[1]["before"][n] - got[0]["before"][n]) if beta.get(role) else g
        if beta.get(role):
            scale = float(g.abs().max()) + 1e-30
            torch.testing.assert_close(got[1]["grads"][n], want, rtol=1e-5, atol=1e-6 * scale)
        else:
            assert torch.equal(got[1]["grads"][n], g), n


def test_smoke_cli_runs_every_fusion_and_variant(tiny_data, tmp_path):
    """The script end to end in a subprocess (sum and gated heads, the release variant), results written."""
    for i, extra in enumerate((("--fusion", "sum"), ("--fusion", "gated", "--variant", "release"))):
        proc = subprocess.run(
            [
                sys.executable,
                "inforeg.py",
                "--dataset",
                "synthetic",
                "--data-root",
                tiny_data,
                "--runs-dir",
                str(tmp_path / str(i)),
                "--no-progress",
                "--batch-size",
                "4",
                "--no-save",
                *map(str, TINY),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            timeout=HANG,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run,) = glob.glob(str(tmp_path / str(i) / "*"))
        r = read_results(run)
        assert math.isfinite(r["last"]["train/loss"]) and "test/acc_audio" in r["last"]


@pytest.mark.parametrize(
    "argv, text",
    [
        (["--beta", -1], "--beta must be >= 0"),
        (["--window-k", 1.5], "--window-k must be in [0, 1], got 1.5"),
        (["--window-epochs", 0, "--variant", "release"], "--window-epochs must be positive"),
        (["--beta-audio", -0.1, "--variant", "release"], "--beta-audio must be >= 0"),
        (["--variant", "release", "--beta", 1], "--beta is a flag of the other variant, not of --variant release"),
        (["--beta-visual", 1], "--beta-visual is a flag of the other variant, not of --variant paper"),
        (["--window-epochs", 3], "--window-epochs is a flag of the other variant"),
        (["--fusion", "film"], "argument --fusion: invalid choice: 'film'"),
        (["--variant", "both"], "argument --variant: invalid choice: 'both'"),
        (["--unimodal-loss", "yes"], "argument --unimodal-loss: invalid choice"),
    ],
)
def test_cli_errors(argv, text, tmp_path, capsys):
    assert text in user_error("inforeg.py", *argv, data_root=tmp_path, capsys=capsys)


# ----------------------------------------------------------------------------------------------------------------
# DDP: one torchrun launch (tests/inforeg_distributed_driver.py), 2 gloo processes
# ----------------------------------------------------------------------------------------------------------------
DDP_RUNS = {
    "paper": ["--epochs", "3", "--window-k", "0"],
    "release": ["--variant", "release"],
}


@pytest.fixture(scope="module")
def ddp(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("inforeg_ddp")
    jobs = []
    for name, extra in DDP_RUNS.items():
        argv = ["--dataset", "synthetic", "--data-root", tiny_data, "--runs-dir", str(out / "runs" / name)]
        argv += ["--no-progress", "--batch-size", "4", "--no-save", *map(str, TINY), *extra]
        jobs.append({"script": "inforeg.py", "argv": argv, "trace": str(out / "traces" / name)})
    with open(out / "jobs.json", "w") as f:
        json.dump({"out": str(out), "runs": jobs}, f)
    torchrun("inforeg_distributed_driver.py", out / "jobs.json")
    return out


def test_ddp_two_halves_equal_one_process_on_the_global_batch(ddp):
    """The block's step on a BatchNorm-free model (tests/mlp_toy.py) under DDP, each process with half of a global
    batch of 16, 3 steps (release variant: batch-sum scores): the strengths, the traces and the parameters equal one
    process on the whole batch (float64, 1e-12): scores summed over the processes, the FIM read from DDP's averaged
    gradient. Each process's own half would give other strengths (the check can fail)."""
    import inforeg_distributed_driver as drv

    one = drv.block_steps(None)
    for r in (0, 1):
        with open(ddp / f"block_rank{r}.json") as f:
            got = json.load(f)
        flat = lambda pairs: [b for pair in pairs for b in pair]  # noqa: E731
        assert flat(got["betas"]) == pytest.approx(flat(one["betas"]), rel=1e-12, abs=0)
        assert got["traces"] == pytest.approx(one["traces"], rel=1e-12)
        assert got["params"] == pytest.approx(one["params"], rel=1e-10, abs=1e-12)
        assert flat(got["local_betas"]) != pytest.approx(flat(one["betas"]), rel=1e-6)
    assert max(max(b) for b in one["betas"][1:]) > 0


def ddp_steps(out, name):
    per_rank = []
    for r in (0, 1):
        steps, pending = [], []
        with open(out / "traces" / name / f"rank{r}.jsonl") as f:
            for line in map(json.loads, f):
                if "reduce" in line:
                    pending.append((line["reduce"], line["sum"]))
                else:
                    steps.append({**line, "reduces": pending})
                    pending = []
        per_rank.append(steps)
    return per_rank


@pytest.mark.parametrize("name", list(DDP_RUNS))
def test_ddp_replicas_identical_and_strengths_of_the_summed_scores(ddp, name):
    """The script under torchrun: identical parameters on both processes after every step, each step's strengths
    from the scores summed over both processes (the reduced [s_a, s_v, n] has n = the global batch 4)."""
    s0, s1 = ddp_steps(ddp, name)
    assert len(s0) == len(s1) == (6 if name == "paper" else 2)
    assert [s["params"] for s in s0] == [s["params"] for s in s1] and len({s["params"] for s in s0}) == len(s0)
    differ = False
    for a, b in zip(s0, s1):
        scores = [(loc, tot) for loc, tot in a["reduces"] if len(loc) == 3]
        (loc0, sum0), (loc1, sum1) = scores[-1], [(x, y) for x, y in b["reduces"] if len(x) == 3][-1]
        assert sum0 == sum1 == pytest.approx([x + y for x, y in zip(loc0, loc1)], rel=1e-6) and sum0[2] == 4
        differ |= loc0 != loc1
        for key in ("train/coeff_audio", "train/coeff_visual", "train/ratio", "train/window_open_audio"):
            assert a["step"][key] == b["step"][key], key
        assert a["step"]["train/ratio"] == pytest.approx(sum0[0] / sum0[1], rel=1e-6)
        if name == "release":
            want = inforeg.release_coefficients(sum0[0], sum0[1], 1.0, 0.05)
            assert (a["step"]["train/coeff_audio"], a["step"]["train/coeff_visual"]) == pytest.approx(want, rel=1e-6)
    assert differ
    (run,) = glob.glob(str(ddp / "runs" / name / "*"))
    assert math.isfinite(read_results(run)["last"]["train/loss"])
