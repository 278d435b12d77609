"""Each method's gradient surgery under the speed flags (--amp, --channels-last, --compile): the scripts' own training
loops, run in this process on the tiny synthetic set, with their gradients read at the optimizer step.

`train_steps` runs a script for a few steps and records, at every optimizer step, the gradients of the encoders and
the head, and the values the step logged. With `freeze=True` the optimizer does not move the parameters, so step k
of two runs with the same seed sees the same parameters and the same batch, and their gradients can be compared:
a run with a method's gradient surgery against a run without it.

On CPU, --amp is bfloat16 autocast (`speed.TrainForward` autocasts on the parameters' device type), so these tests
run the same code path as a GPU run with --amp.
"""

import math

import pytest
import torch
from conftest import run_inproc
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from common import distributed, runs, speed


class Stop(Exception):
    """Raised after the last recorded step: no evaluation, no checkpoint."""


def train_steps(script, data_root, runs_dir, n_steps, *flags, freeze=True, reduce=None):
    """Run `script` for `n_steps` training steps; returns one record per optimizer step: "grads" {parameter name:
    float32 copy of its gradient at the step, or None}, "stats" (the values the batch logged), and with
    freeze=False "before" and "after" {name: float32 copy of the parameter} around the step. freeze=True: the
    optimizer step moves nothing (parameters stay at their init). reduce: replaces distributed.all_reduce_sum (the
    sums a method's statistics are built from)."""
    records, models, logged = [], [], []
    real_train_forward, real_log_step = speed.train_forward, runs.Run.log_step

    def train_forward(model, args):
        models.append(model)
        return real_train_forward(model, args)

    def params():
        return {n: p.detach().float().clone() for n, p in models[0].named_parameters()}

    def before(opt, *_):
        grads = {
            n: None if p.grad is None else p.grad.detach().float().clone() for n, p in models[0].named_parameters()
        }
        records.append({"grads": grads} if freeze else {"grads": grads, "before": params()})
        if freeze:  # SGD and AdamW leave a parameter without a gradient untouched
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    def after(opt, *_):
        if not freeze:
            records[-1]["after"] = params()

    def log_step(self, stats, n_samples):
        real_log_step(self, stats, n_samples)
        logged.append(dict(stats))
        if len(logged) == n_steps:
            self.logger.writer.close()
            raise Stop

    hooks = [
        register_optimizer_step_pre_hook(before),
        register_optimizer_step_post_hook(after),
    ]  # every optimizer's steps
    try:
        with pytest.MonkeyPatch.context() as m, pytest.raises(Stop):
            m.setattr(speed, "train_forward", train_forward)
            m.setattr(runs.Run, "log_step", log_step)
            if reduce is not None:
                m.setattr(distributed, "all_reduce_sum", reduce)
            run_inproc(script, data_root, runs_dir, "--max-steps", n_steps, *flags)
    finally:
        for h in hooks:
            h.remove()
    per_step = len(records) // n_steps
    for i, r in enumerate(records):
        r["stats"] = logged[i // per_step]
    return records


def flat(tensors, role):
    """The tensors of one role (`audio_net`, `head`, ...) as one vector (parameters without a gradient left out)."""
    parts = [t.reshape(-1) for n, t in tensors.items() if n.startswith(role + ".") and t is not None]
    return torch.cat(parts) if parts else None


def ratio(got, ref):
    """|got| / |ref| and the cosine of the two gradients (in float64: 11 M float32 terms)."""
    got, ref = got.double(), ref.double()
    return (got.norm() / ref.norm()).item(), (got @ ref / (got.norm() * ref.norm())).item()


# ---------------------------------------------------------------------------------------------------------------
# ARL: GradScale multiplies the gradient entering encoder m by 1 + c_m, with either coefficient timing
# ---------------------------------------------------------------------------------------------------------------
ARL_T = 8.0  # the synthetic preset's temperature


ARL_C_A = (0.8, 0.3)  # c_a of the coefficients arl_reduce makes at step 0 and step 1


def arl_reduce(c_as=ARL_C_A):
    """A stand-in for the sum over processes that makes ARL's coefficients (c_a, 1 - c_a) with c_a = c_as[k] at its
    k-th call (one call per step): equal entropies (w_a = 1/2) and the dependence share d_a = 1/2 - logit(c_a) / T,
    so c_a = sigmoid(T (w_a - d_a))."""
    calls = []

    def reduce(sums):
        c_a = c_as[min(len(calls), len(c_as) - 1)]
        calls.append(c_a)
        d_a = 0.5 - math.log(c_a / (1 - c_a)) / ARL_T
        c = (sums.numel() - 3) // 2
        n = sums[-1]
        out = torch.cat([torch.full((c,), d_a / c), torch.full((c,), (1 - d_a) / c), torch.ones(2)]).to(sums) * n
        return torch.cat([out, n[None]])

    return reduce


def arl_grads(tiny_data, tmp_path, timing, *flags, warmup=0):
    """Step 1 (the second step) of arl.py: with --arl-coeff-timing previous it applies step 0's coefficients
    (c_a = 0.8), with current its own (c_a = 0.3). warmup=1: the same step unscaled (the warm-up with --gamma 1 trains
    the same loss)."""
    recs = train_steps(
        "arl.py",
        tiny_data,
        tmp_path,
        2,
        "--arl-coeff-timing",
        timing,
        "--gamma",
        "1",
        "--warmup-epochs",
        warmup,
        "--clip-grad",
        "0",
        *flags,
        reduce=arl_reduce(),
    )
    return recs[1]


def patch_compile(monkeypatch):
    """--compile with torch.compile's "eager" backend: TorchDynamo captures the encoders' forward as with the default
    backend (their outputs come from the compiled module), without inductor's minutes of code generation on CPU."""
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, **{**kw, "backend": "eager"}))


ARL_CASES = {  # flags: the timings checked (each against the same unscaled step)
    "fp32": ((), ("previous", "current")),
    "amp": (("--amp",), ("previous", "current")),
    "amp-channels-last": (("--amp", "--channels-last"), ("current",)),
    "compile-channels-last": (("--compile", "--channels-last"), ("current",)),
}


@pytest.mark.parametrize("case", ARL_CASES)
def test_arl_encoder_gradients_times_one_plus_c(monkeypatch, tiny_data, tmp_path, case):
    """Encoder m's gradient is (1 + c_m) times the unscaled step's, the head's is unchanged, and train/coeff_* logs
    the multipliers that acted, for each timing and speed flag. The coefficients change from step to step (c_a 0.8,
    then 0.3), so the second step tells the timings apart: previous applies (0.8, 0.2), current (0.3, 0.7)."""
    flags, timings = ARL_CASES[case]
    amp = "--amp" in flags
    if "--compile" in flags:
        patch_compile(monkeypatch)
    ref = arl_grads(tiny_data, tmp_path / "ref", "previous", *flags, warmup=1)  # the warm-up: no GradScale
    assert ref["stats"]["train/coeff_audio"] == ref["stats"]["train/coeff_visual"] == 1.0
    for timing in timings:
        got = arl_grads(tiny_data, tmp_path / timing, timing, *flags)
        c_a = ARL_C_A[0] if timing == "previous" else ARL_C_A[1]
        assert (got["stats"]["train/coeff_audio"], got["stats"]["train/coeff_visual"]) == pytest.approx(
            (1 + c_a, 2 - c_a)
        )
        for role, want in (("audio_net", 1 + c_a), ("visual_net", 2 - c_a), ("head", 1.0)):
            r, cos = ratio(flat(got["grads"], role), flat(ref["grads"], role))
            # bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3): with --amp the ratio holds to 6e-3
            assert r == pytest.approx(want, rel=6e-3 if amp else 1e-5), (timing, role)
            assert cos > (0.999 if amp else 1 - 1e-9), (timing, role)


# ---------------------------------------------------------------------------------------------------------------
# OGM-GE: after backward the dominant encoder's conv-kernel gradients are multiplied by k; GE adds N(0, std(g)^2)
# ---------------------------------------------------------------------------------------------------------------
def test_ogm_modulation_and_ge_noise_under_amp(tiny_data, tmp_path):
    flags = ("--amp", "--channels-last", "--clip-grad", "0")
    ref = train_steps("ogm.py", tiny_data, tmp_path / "none", 1, "--modulation", "none", *flags)[0]
    ogm = train_steps("ogm.py", tiny_data, tmp_path / "ogm", 1, "--modulation", "ogm", *flags)[0]
    ge = train_steps("ogm.py", tiny_data, tmp_path / "ge", 1, "--modulation", "ogm_ge", *flags)[0]
    k = {"audio_net": ogm["stats"]["train/coeff_audio"], "visual_net": ogm["stats"]["train/coeff_visual"]}
    assert sorted(k.values())[0] < 0.9 and sorted(k.values())[1] == 1.0  # one side is modulated, visibly
    assert ge["stats"]["train/coeff_audio"] == k["audio_net"] and ge["stats"]["train/coeff_visual"] == k["visual_net"]
    n_noisy = 0
    for name, g in ref["grads"].items():
        role = name.split(".")[0]
        conv = g.dim() == 4 and role in k
        assert g.abs().sum() > 0, name
        # OGM: k g on the conv kernels of the encoders, everything else (BatchNorm, head) untouched
        torch.testing.assert_close(ogm["grads"][name], k[role] * g if conv else g, rtol=1e-6, atol=0)
        if not conv:
            assert torch.equal(ge["grads"][name], g), name
            continue
        noise = ge["grads"][name] - k[role] * g  # GE: N(0, std(g)^2), the std of the unscaled gradient
        if noise.numel() >= 4096:
            n_noisy += 1
            assert noise.std().item() == pytest.approx(g.std().item(), rel=0.1), name
            assert abs(noise.mean().item()) < 0.1 * g.std().item(), name
    assert n_noisy > 10


# ---------------------------------------------------------------------------------------------------------------
# DGL: the encoders get only the alpha-weighted unimodal gradient, the head only the fused one
# ---------------------------------------------------------------------------------------------------------------
def test_dgl_truncations_under_amp(tiny_data, tmp_path):
    """Doubling alpha doubles every encoder gradient exactly (no fused-loss part reaches the encoders) and leaves the
    head's gradient unchanged (no unimodal-loss part reaches it); the release's two backward passes agree."""
    flags = ("--amp", "--channels-last", "--clip-grad", "0")
    g2 = train_steps("dgl.py", tiny_data, tmp_path / "a2", 1, "--alpha", "2", *flags)[0]["grads"]
    g4 = train_steps("dgl.py", tiny_data, tmp_path / "a4", 1, "--alpha", "4", *flags)[0]["grads"]
    two = train_steps("dgl.py", tiny_data, tmp_path / "two", 1, *"--alpha 4 --dgl-impl two-pass".split(), *flags)[0][
        "grads"
    ]
    for role in ("audio_net", "visual_net", "head"):
        a2, a4, t4 = flat(g2, role), flat(g4, role), flat(two, role)
        assert a2.abs().sum() > 0, role
        torch.testing.assert_close(a4, a2 if role == "head" else 2 * a2, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(t4, a4, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# AUG: per batch an audio step that moves only audio parameters, then a visual step that moves only visual ones
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_grad", ["pytorch1", "pytorch2"])
def test_aug_steps_move_one_modality_under_amp(tiny_data, tmp_path, zero_grad):
    """The audio step moves only the audio side and the head; the visual step only the visual side and the head, and
    with --zero-grad pytorch1 (the default) also the audio side, whose gradients are zero tensors (momentum and weight
    decay alone)."""
    audio_step, visual_step = train_steps(
        "aug.py", tiny_data, tmp_path, 1, *"--amp --channels-last --zero-grad".split(), zero_grad, freeze=False
    )
    for step, mine, other in ((audio_step, "audio", "visual"), (visual_step, "visual", "audio")):
        for role in (f"{other}_net", f"{other}_classifiers"):
            if zero_grad == "pytorch1" and mine == "visual":
                assert not flat(step["grads"], role).any(), role
                assert not torch.equal(flat(step["after"], role), flat(step["before"], role)), role
                continue
            assert flat(step["grads"], role) is None, (mine, role)
            assert torch.equal(flat(step["after"], role), flat(step["before"], role)), (mine, role)
        for role in (f"{mine}_net", f"{mine}_classifiers", "head"):
            assert flat(step["grads"], role).abs().sum() > 0, (mine, role)
            assert not torch.equal(flat(step["after"], role), flat(step["before"], role)), (mine, role)
