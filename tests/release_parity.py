"""Helpers of the release-parity tests (tests/test_parity_<method>.py; not collected by pytest).

`run_script` runs a method script's own training loop (runpy, in this process: the script's block and loop lines as
`python <script>.py` runs them) in float64 on batches the test gives, and returns the model before the first step, the
model after the last one, the parsed flags and each step's logged values. A test then re-expresses the release's
training step in its own short code (each line citing the release file and line it follows), runs it on a copy of
the same initial model and the same batches, and compares every parameter and buffer.

How the script is made to run in float64 on given batches: torch's default dtype is float64 while it runs (the model
is built in float64), `common.data.make_loaders` returns loaders over the test's float64 tensors (spectrograms
(B, F, T), frames (B, 3, T_f, H, W) already normalised, which the visual encoder takes as they are), and
`runs.save_checkpoint` writes nothing. `Run.log_step` raises `Stop` after the last wanted step.
"""

import contextlib
import copy
import gc
import json
import os
import sys

import pytest
import torch
from conftest import run_inproc

from common import data, runs, speed

C, B = 6, 8  # the synthetic set's classes; the batch size (BatchNorm over 8 values on the 1 x 1 layer-4 maps of
# these small inputs: with 4, rounding differences grow to 1e-11 in 6 steps, with 8 they stay near 1e-13)


class Stop(Exception):
    """Raised after the last recorded step."""


def make_batches(n, seed=0, audio_signal=1.0):
    """n batches (spec (B, 17, 17), frames (B, 3, 1, 16, 16), label (B,)) in float64. audio_signal > 0 adds the label
    to the spectrogram (a class-dependent offset on one band per class), so audio tends to dominate."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(C, (B,), generator=g)
        spec = torch.randn(B, 17, 17, generator=g, dtype=torch.float64)
        spec[torch.arange(B), 2 * label] += audio_signal
        frames = torch.randn(B, 3, 1, 16, 16, generator=g, dtype=torch.float64)
        out.append((spec, frames, label))
    return out


def loader(batches):
    """A DataLoader that yields exactly these batches, in order, every epoch."""
    tensors = [torch.cat([b[i] for b in batches]) for i in range(3)]
    dataset = torch.utils.data.TensorDataset(*tensors)
    return torch.utils.data.DataLoader(dataset, batch_size=B, shuffle=False, generator=torch.Generator())


def run_script(script, data_root, runs_dir, batches, n_steps, *flags, patches=()):
    """Run `script` (--dataset synthetic, batch 8) for n_steps training steps on `batches` (each epoch restarts at the
    first; use --max-steps to end an epoch early) in float64. Returns {"init": a deep copy of the model when the loop
    starts, "model": the model after the last step, "args", "stats": the values each step logged}. patches: extra
    (object, name, value) monkeypatches."""
    out = {"stats": []}
    real_train_forward, real_log_step = speed.train_forward, runs.Run.log_step

    def make_loaders(train_set, test_set, args, generator):
        assert args.batch_size == B
        return loader(batches), loader(batches[:1])  # the test split: 8 clips (the synthetic set has 12)

    def train_forward(model, args):
        out.update(init=copy.deepcopy(model), model=model, args=args, namespace=sys._getframe(1).f_globals)
        return real_train_forward(model, args)

    def log_step(self, stats, n_samples):
        real_log_step(self, stats, n_samples)
        out["stats"].append(dict(stats))
        if len(out["stats"]) == n_steps:
            self.logger.writer.close()
            raise Stop

    gc.collect()  # the previous run's script namespace (a reference cycle holding its model and optimizer)
    with pytest.MonkeyPatch.context() as m, float64():
        m.setattr(data, "make_loaders", make_loaders)
        m.setattr(speed, "train_forward", train_forward)
        m.setattr(runs.Run, "log_step", log_step)
        m.setattr(runs, "save_checkpoint", lambda path, state: None)
        for obj, name, value in patches:
            m.setattr(obj, name, value)
        try:
            run_inproc(script, data_root, runs_dir, "--batch-size", B, *map(str, flags))
        except Stop:
            pass
    # the script's namespace outlives the run when something global keeps one of its functions (arl.py's GradScale,
    # an autograd.Function, is registered by torch): empty it, so that it does not keep the run's optimizer alive
    out.pop("namespace").clear()
    assert len(out["stats"]) == n_steps
    assert all(p.dtype == torch.float64 for p in out["model"].parameters())
    return out


@contextlib.contextmanager
def float64():
    """torch's default dtype float64 inside (a transcription's `torch.tensor([0.0, 0.0])` is then float64, as the
    script's run), the previous one after."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def max_diff(model_a, model_b):
    """The largest absolute difference over every parameter and floating-point buffer of two models with the same
    structure (and the names must match)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


def parity(got, want):
    """max_diff(got, want); with $PARITY_LOG set, also appended there with the test's id (a table of the
    differences: `PARITY_LOG=/tmp/parity.jsonl pytest -k parity`)."""
    diff = max_diff(got, want)
    if os.environ.get("PARITY_LOG"):
        with open(os.environ["PARITY_LOG"], "a") as f:
            f.write(
                json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "max_diff": diff}) + "\n"
            )
    return diff


def moved(model_a, model_b):
    """The largest absolute change of the parameters two models share (a control: the steps did move them)."""
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    return max((pa[k] - pb[k]).abs().max().item() for k in pa.keys() & pb.keys())


def sgd(model, args):
    """The optimizer the release builds (SGD, momentum 0.9, weight decay 1e-4), at the run's learning rate."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)


TOL = 1e-12  # float64, 3+ optimizer steps
