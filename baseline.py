"""Joint training, the "naive" row of every paper: the fused cross-entropy alone trains both encoders and the head."""

import torch

# isort: split
import random

import numpy as np
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed, flags, runs, speed
from common.data import build_datasets, make_loaders, seed_epoch
from common.evaluate import evaluate
from common.models import AVClassifier, unimodal_logits

# per dataset, the optimisation (a flag left out takes its value here; sources in the script's docs page); the LR is
# multiplied by --lr-gamma at each 0-based epoch of lr_milestones
PRESETS = {
    "cremad": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "ks": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "vggsound": dict(optimizer="sgd", lr=1e-3, lr_milestones=[70], batch_size=64, epochs=100),
    "synthetic": dict(optimizer="sgd", lr=1e-2, lr_milestones=[8], batch_size=32, epochs=10),
}


def parse_args(argv=None):
    p = flags.parser(__doc__, __file__)  # the shared flags: common/flags.py
    p.add_argument("--fusion", default="concat", choices=["concat", "sum", "film", "gated"], help="fusion head")
    p.add_argument("--modality", default="both", choices=["both", "audio", "visual"], help="audio/visual: unimodal")
    args = p.parse_args(argv)
    return flags.fill(args, PRESETS[args.dataset])


if __name__ == "__main__":
    args, ckpt = runs.saved_run(parse_args())  # --resume / --eval-only: the saved run's settings
    distributed.init_process_group(args)  # torchrun: one process per device (no-op in a single process)

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
    train_loader, test_loader = make_loaders(train_set, test_set, args, torch.Generator())
    model = AVClassifier(num_classes, args.fusion, train_set.frontend, args.modality).to(device)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    train_forward = distributed.ddp(speed.train_forward(model, args), args)  # --amp; torchrun: DDP

    def eval_logits(audio, visual):
        f_a, f_v, z = model(audio, visual)
        z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")
        return z, z_a, z_v

    def run_eval():
        return evaluate(eval_logits, test_loader, device, num_classes, args.eval_max_steps)

    if args.eval_only:  # print the checkpoint's test metrics, then exit
        runs.print_evaluation(args.checkpoint, ckpt, model, run_eval)
        raise SystemExit(0)
    run = runs.Run(args, ckpt, model, optimizer, scheduler, (train_set, test_set))  # run folder; --resume
    for epoch in range(run.start_epoch, args.epochs):
        run.begin_epoch()
        model.train()
        seed_epoch(train_loader, args.seed * 100_003 + epoch)  # shuffle and augmentation: (seed, epoch) only
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=args.no_progress)
        for step, (spec, frames, label) in enumerate(bar):
            if args.max_steps and step >= args.max_steps:
                break
            audio, visual, label = spec.unsqueeze(1).to(device), frames.to(device), label.to(device)

            f_a, f_v, z = train_forward(lambda m: m(audio, visual))
            z_a, z_v = unimodal_logits(model.head, f_a, f_v, bias="half")  # the head's per-modality logits
            loss = F.cross_entropy(z, label)
            logs = {"train/loss": loss.item(), **runs.branch_logs(z_a, z_v, label)}

            optimizer.zero_grad()
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            run.log_step(logs, label.shape[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = run.train_metrics(optimizer)
        scheduler.step()
        distributed.broadcast_buffers(model)  # torchrun: rank 0's BatchNorm statistics in every process

        model.eval()
        metrics.update(run_eval())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if run.end_epoch(epoch, metrics, {**state, "class_names": class_names}):  # --stop-after-epochs
            break
    run.finish()
