"""The GenDD reference's own CIFAR-100 stage-2 training step, timed on this CPU (PyTorch).

    python bench/gendd_reference_step.py --reference PATH [--pairs res110_res32 ...]

PATH is a checkout of github.com/jiequancui/Generative-Distribution-Distillation (its
`GenDD_cifar` folder, or the repository root); nothing of it is copied into this project, its
modules are imported from there. One step is what its `helper/loops.train_distill` does for a
batch of 64: the teacher's forward under no_grad (eval mode), the student `DiffModel`'s stage-2
loss (diffusion loss over M = 30 rows per token plus the probe's cross-entropy), backward, the
beta2 update of the param groups and AdamW's step, with the CIFAR-100 scripts' flags (width 1024,
depth 3, token_dim 64, cond_drop 0.2, beta 1, the pair's smooth; weight decay 5e-2, none on the
"ln"/"diffloss" group). The batch is random CIFAR-shaped floats, already augmented: the
reference augments in its DataLoader's worker processes, outside the step. Medians after warm-up.

Run as its own process: the reference's `models` package would clash with this project's, so
this file never puts the project on sys.path. Prints one JSON object {pair: {"step_s": ...,
"torch": version, "reference_commit": ...}}. `--serve` (one pair; what bench/gendd_step.py
`--reference` uses to take turns with its own step): builds the step, prints its JSON header
line, then runs one step per "step" line read from stdin and prints its seconds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PAIRS = {"res110_res32": ("resnet110", "resnet32", 0.9), "res32x4_res8x4": ("resnet32x4", "resnet8x4", 0.7)}
BATCH = 64


def reference_root(path: str) -> str:
    for candidate in (os.path.join(path, "GenDD_cifar"), path):
        if os.path.isfile(os.path.join(candidate, "diffloss.py")):
            return candidate
    sys.exit(f"error: {path} is not a checkout of the GenDD reference (no GenDD_cifar/diffloss.py)")


def commit_of(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_step(pair: str):
    """The reference's training step of `pair` on a fixed random batch: `step(i)` runs step i."""
    import torch
    from torch import nn

    from models import model_dict  # the reference's

    teacher_arch, student_arch, smooth = PAIRS[pair]
    torch.manual_seed(0)
    teacher = model_dict[teacher_arch](num_classes=100).eval()
    student = model_dict[student_arch](num_classes=100)
    model_s = model_dict["DiffModel"](
        model=student, classifier=teacher.fc, feature_dim=student.fc.weight.size(1),
        target_dim=teacher.fc.weight.size(1), smooth=smooth, stage="stage-2", beta=1.0, token_dim=64,
        cond_drop_prob=0.2, diffloss_w=1024, diffusion_batch_mul=30).train()
    decayed, not_decayed = [], []  # the reference's param_groups_setup: no decay on ln / diffloss
    for name, param in model_s.named_parameters():
        if param.requires_grad:
            (not_decayed if "ln" in name or "diffloss" in name else decayed).append(param)
    optimizer = torch.optim.AdamW([{"params": not_decayed, "weight_decay": 0.0},
                                   {"params": decayed, "weight_decay": 5e-2}], betas=(0.9, 0.95), lr=1e-3)
    cross_entropy = nn.CrossEntropyLoss()
    images = torch.rand(BATCH, 3, 32, 32)
    labels = torch.randint(0, 100, (BATCH,))

    def step(i):
        with torch.no_grad():
            teacher_features, _ = teacher(images, is_feat=True, preact=False)
        diff_loss, probe_logits = model_s(images, y=labels, target_feature=teacher_features[-1])
        loss = diff_loss + cross_entropy(probe_logits, labels)
        loss.item()  # as the reference's meters do
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:  # its per-step beta2 schedule
            group["betas"] = (0.9, 0.95 + 1e-6 * i)
        optimizer.step()

    return step


def timed(step, i: int) -> float:
    start = time.perf_counter()
    step(i)
    return time.perf_counter() - start


def step_seconds(pair: str, repeats: int, warmup: int) -> float:
    step = build_step(pair)
    times = [timed(step, i) for i in range(warmup + repeats)]
    return statistics.median(times[warmup:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="a checkout of the GenDD reference")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="one step per 'step' line on stdin")
    args = parser.parse_args(argv)
    root = reference_root(args.reference)
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(os.cpu_count())
    header = {"torch": torch.__version__, "reference_commit": commit_of(root)}
    if args.serve:
        step = build_step(args.pairs[0])
        print(json.dumps(header), flush=True)
        for i, line in enumerate(sys.stdin):
            if line.strip() == "step":
                print(timed(step, i), flush=True)
        return
    out = {pair: {"step_s": step_seconds(pair, args.repeats, args.warmup), **header} for pair in args.pairs}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
