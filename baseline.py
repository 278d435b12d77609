# docs and experiment results: docs/baseline.md
"""Joint training: two ResNet18 encoders and a fusion head trained by the fused cross-entropy alone.

The "naive" row of every paper, and the file every method script is read against (`diff baseline.py ogm.py`).
`--modality audio|visual` trains a unimodal model (the papers' audio-only and visual-only rows).
"""

import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, runs
from common.data import build_datasets, make_loaders
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits

# optimisation settings per dataset (None in a flag = take it from here; docs/baseline.md); milestones are the
# 0-based epochs at which the LR is multiplied by --lr-gamma
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}


def parse_args(argv=None):
    p = runs.make_parser(__doc__, __file__)
    # Algorithm specific arguments
    p.add_argument("--modality", default="both", choices=["both", "audio", "visual"],
                   help="both = joint training; audio/visual = unimodal baseline")
    return p.parse_args(argv)


def forward(model, audio, visual, modality="both"):
    """Encoders then head; a unimodal baseline feeds zeros for the missing modality's feature."""
    a = model.audio_net(audio) if modality != "visual" else None
    v = model.visual_net(visual) if modality != "audio" else None
    a = torch.zeros_like(v) if a is None else a
    v = torch.zeros_like(a) if v is None else v
    return model.head(a, v)


if __name__ == "__main__":
    args, ckpt = runs.setup(parse_args(), PRESETS)  # --resume / --eval-only: the saved run's settings
    distributed.init(args)  # torchrun: join the process group (no-op in a single process)

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)

    # data, model, optimizer
    train_set, test_set, class_names = build_datasets(args)
    num_classes = len(class_names)
    loader_gen = torch.Generator()
    train_loader, test_loader = make_loaders(train_set, test_set, args.batch_size, args.num_workers, loader_gen,
                                             args.pin_memory, args.persistent_workers)
    model = AVClassifier(num_classes, args.fusion, train_set.frontend).to(device)
    optimizer = runs.make_optimizer(args, model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    train_forward = distributed.wrap(model, args, find_unused=args.modality != "both")  # DDP under torchrun; --amp

    def eval_logits(audio, visual):
        f_a, f_v, z = forward(model, audio, visual, args.modality)
        if args.fusion == "film":  # FiLM has no unimodal logits (docs/models.md): fused metrics only
            return z, None, None
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, (z_a if args.modality != "visual" else None), (z_v if args.modality != "audio" else None)

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:
        runs.evaluate_checkpoint(args, ckpt, model, run_eval)
    run = runs.Run(args, ckpt, model, optimizer, scheduler)  # run folder, logs; --resume: restores the state

    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)  # shuffling and augmentation depend only on (seed, epoch)
        distributed.set_epoch(train_loader)  # torchrun: this process's shard and augmentation stream
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_forward(lambda m: forward(m, audio, visual, args.modality))
            loss = F.cross_entropy(z, label)
            with torch.no_grad():  # monitoring only: unimodal losses and the score ratio s_a / s_v
                z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half") if args.fusion != "film" else (z, z)
                loss_a, loss_v = F.cross_entropy(z_a, label), F.cross_entropy(z_v, label)
                s_a = torch.softmax(z_a, 1).gather(1, label[:, None]).sum()
                s_v = torch.softmax(z_v, 1).gather(1, label[:, None]).sum()

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()

            run.log_step({"train/loss": loss.item(), "train/loss_audio": loss_a.item(),
                          "train/loss_visual": loss_v.item(), "train/ratio": (s_a / s_v).item(),
                          "train/coeff_audio": 1.0, "train/coeff_visual": 1.0}, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()

        model.eval()
        metrics.update(run_eval())
        run.end_epoch(epoch, metrics, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "class_names": class_names})
    run.finish()
