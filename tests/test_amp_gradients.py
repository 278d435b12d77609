"""Each method's gradient surgery under the speed flags (--amp, --channels-last, --compile): the scripts' own training
loops, run in this process on the tiny synthetic set, with their gradients read at the optimizer step.

`train_steps` runs a script for a few steps and records, at every optimizer step, the gradients of the encoders and
the head, and the values the step logged. With `freeze=True` the optimizer does not move the parameters, so step k
of two runs with the same seed sees the same parameters and the same batch, and their gradients can be compared:
a run with a method's gradient surgery against a run without it.

On CPU, --amp is bfloat16 autocast (`distributed.TrainForward` autocasts on the parameters' device type), so these
tests run the same code path as a GPU run with --amp.
"""

import math

import pytest
import torch
from conftest import run_inproc

from common import distributed, runs

ROLES = ("audio_net", "visual_net", "head")


class Stop(Exception):
    """Raised after the last recorded step: no evaluation, no checkpoint."""


def train_steps(script, data_root, runs_dir, n_steps, *flags, freeze=True, reduce=None):
    """Run `script` for `n_steps` training steps; returns one record per optimizer step:
    {"grads": {role: flat float32 gradient (None if no parameter of the role has one)}, "stats": the step's logged
    values (the last ones logged so far)}. freeze: the optimizer step is skipped (parameters stay at their init).
    reduce: replaces distributed.all_reduce_sum (the sums a method's statistics are built from)."""
    records, models, logged = [], [], []
    real_wrap, real_make_optimizer, real_log_step = distributed.wrap, runs.make_optimizer, runs.Run.log_step

    def wrap(model, args, **kw):
        models.append(model)
        return real_wrap(model, args, **kw)

    def make_optimizer(args, params):
        optimizer = real_make_optimizer(args, params)

        def record(opt, *_):
            grads = {}
            for role in ROLES:
                gs = [p.grad.detach().float().reshape(-1) for p in getattr(models[0], role).parameters()
                      if p.grad is not None]
                grads[role] = torch.cat(gs).clone() if gs else None
            records.append({"grads": grads})
            if freeze:  # SGD and AdamW leave a parameter without a gradient untouched
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.grad = None

        optimizer.register_step_pre_hook(record)
        return optimizer

    def log_step(self, stats, n_samples):
        real_log_step(self, stats, n_samples)
        logged.append(dict(stats))
        if len(logged) == n_steps:
            self.logger.writer.close()
            raise Stop

    with pytest.MonkeyPatch.context() as m, pytest.raises(Stop):
        m.setattr(distributed, "wrap", wrap)
        m.setattr(runs, "make_optimizer", make_optimizer)
        m.setattr(runs.Run, "log_step", log_step)
        if reduce is not None:
            m.setattr(distributed, "all_reduce_sum", reduce)
        run_inproc(script, data_root, runs_dir, "--max-steps", n_steps, *flags)
    per_step = len(records) // n_steps
    for i, r in enumerate(records):
        r["stats"] = logged[i // per_step]
    return records


def ratio(got, ref):
    """|got| / |ref| and the cosine of the two gradients (in float64: 11 M float32 terms)."""
    got, ref = got.double(), ref.double()
    return (got.norm() / ref.norm()).item(), (got @ ref / (got.norm() * ref.norm())).item()


# ---------------------------------------------------------------------------------------------------------------
# ARL: GradScale multiplies the gradient entering encoder m by 1 + c_m, with either coefficient timing
# ---------------------------------------------------------------------------------------------------------------
ARL_T = 8.0  # the synthetic preset's temperature


def arl_reduce(c_a):
    """A stand-in for the sum over processes that makes ARL's coefficients (c_a, 1 - c_a) at every step: equal
    entropies (w_a = 1/2) and the dependence share d_a = 1/2 - logit(c_a) / T, so c_a = sigmoid(T (w_a - d_a))."""
    d_a = 0.5 - math.log(c_a / (1 - c_a)) / ARL_T

    def reduce(sums):
        c = (sums.numel() - 3) // 2
        n = sums[-1]
        out = torch.cat([torch.full((c,), d_a / c), torch.full((c,), (1 - d_a) / c), torch.ones(2)]).to(sums) * n
        return torch.cat([out, n[None]])

    return reduce


def arl_grads(tiny_data, tmp_path, timing, *flags, warmup=0, c_a=0.8):
    """Step 1 (the second step) of arl.py: with --arl-coeff-timing previous it applies step 0's coefficients, with
    current its own; both are (c_a, 1 - c_a). warmup=1: the same step unscaled (the warm-up with --gamma 1 trains the
    same loss)."""
    recs = train_steps("arl.py", tiny_data, tmp_path, 2, "--arl-coeff-timing", timing, "--gamma", "1",
                       "--warmup-epochs", warmup, "--clip-grad", "0", *flags, reduce=arl_reduce(c_a))
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
    the multipliers that acted: c = (0.8, 0.2), for each timing and speed flag."""
    flags, timings = ARL_CASES[case]
    amp = "--amp" in flags
    if "--compile" in flags:
        patch_compile(monkeypatch)
    ref = arl_grads(tiny_data, tmp_path / "ref", "previous", *flags, warmup=1)  # the warm-up: no GradScale
    assert ref["stats"]["train/coeff_audio"] == ref["stats"]["train/coeff_visual"] == 1.0
    for timing in timings:
        got = arl_grads(tiny_data, tmp_path / timing, timing, *flags)
        assert (got["stats"]["train/coeff_audio"], got["stats"]["train/coeff_visual"]) == pytest.approx((1.8, 1.2))
        for role, want in (("audio_net", 1.8), ("visual_net", 1.2), ("head", 1.0)):
            r, cos = ratio(got["grads"][role], ref["grads"][role])
            assert r == pytest.approx(want, rel=2e-3 if amp else 1e-5), (timing, role)
            assert cos > (0.999 if amp else 1 - 1e-9), (timing, role)
