"""The speed flags: --amp (bfloat16 autocast of the training forward), --channels-last, --compile, --cudnn-benchmark.
What is trained stays the same (up to bfloat16 rounding with --amp)."""

import torch
import torch.nn as nn


class TrainForward(nn.Module):
    """`train_forward(fn)` runs `fn(model)`, the script's training forward pass, under bfloat16 autocast with --amp,
    returning float32 outputs, so the losses and every statistic stay float32. It is the module DDP wraps
    (common/distributed.py ddp), so DDP sees each training forward and averages the gradients of the backward pass
    that follows.
    With --amp the returned float32 tensors are new tensors (casts of the bfloat16 ones `fn` computed): gradient
    surgery belongs inside `fn` (e.g. arl.py's GradScale), since a hook on a returned copy misses the gradient that
    reaches the original through the rest of `fn`'s graph."""

    def __init__(self, model, amp=False):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, fn):
        if not self.amp:
            return fn(self.model)
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return _float32(fn(self.model))


def _float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


def train_forward(model, args):
    """Apply --channels-last, --cudnn-benchmark and --compile to `model` (in place) and return its TrainForward (--amp).

    --compile compiles the encoders' ResNet18 trunks (the audio front-end's complex STFT stays outside the graph).
    """
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    if args.compile:
        model.audio_net.trunk.compile()
        model.visual_net.trunk.compile()
    return TrainForward(model, args.amp)
