"""(g) The streaming input path: images per second per grain worker on generated JPEGs, and the
loader's share of an ImageNet-shape training step.

    python bench/streaming.py                       # 256 JPEGs, workers 0 and 2, ResNet-18 step
    python bench/streaming.py --images 64 --batch 8 --size 64 --steps 2 --workers 0   # smoke

1. Loader: a folder of `--images` generated JPEGs of ImageNet's typical sizes (shorter side 333
   to 500, quality 90) and the ImageNet training transform (data.image_ops.TrainTransform:
   RandomResizedCrop (0.08, 1) to `--size`, flip, RandAugment (2, 9) with `--randaugment`,
   default on). Per worker: the read + decode + augment of one example, timed serially in this
   process. Through grain: one untimed epoch (file cache), then one timed epoch of
   data.stream.Stream for each `--workers` count (0: grain's threads in this process), its
   images/s including the start of its worker processes, and the time to its first batch.
2. Step: ResNet-18 (the zoo's, torchvision's definition) trained at `--size` with batch
   `--batch` by the trainer's streaming step (utils.trainer.make_stream_train_step): `--steps`
   steps on streamed batches prefetched onto the devices as the trainer does, against the same
   number of steps on one synthetic batch already on the devices. The loader's share of a step
   = 1 - synthetic / streamed time per step (0 when the loader hides behind the step; on a CPU
   the workers and the step share the same cores). Timed after a compiled, untimed step.
"""
import argparse
import os
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from data.image_ops import TrainTransform
from data.sources import ImageFolderSource
from data.stream import Stream
from utils.trainer import (TrainState, make_mesh, make_stream_train_step, prefetched, put_replicated,
                           to_mesh)


def write_jpegs(root: str, count: int, classes: int = 8, seed: int = 0):
    """`count` random JPEGs in `classes` class folders, ImageNet-like sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        short = int(rng.integers(333, 501))
        shape = (short, int(short * 4 / 3), 3) if i % 2 else (int(short * 4 / 3), short, 3)
        # smooth content (as photographs), so JPEG sizes and decode times are realistic
        base = rng.integers(0, 256, (shape[0] // 16 + 1, shape[1] // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((shape[1], shape[0]), Image.BILINEAR)
        image.save(os.path.join(folder, f"{i}.JPEG"), quality=90)


def per_worker_rate(source, transform, count: int) -> dict:
    """What one worker does per example (read, decode, augment), timed serially in this process."""
    rng = np.random.default_rng(0)
    transform(source[0]["image"], rng)  # untimed: file cache, Pillow's first call
    start = time.perf_counter()
    for i in range(count):
        transform(source[i % len(source)]["image"], rng)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def loader_throughput(source, transform, size: int, batch: int, workers: int) -> dict:
    """One epoch through the Stream (grain) after an untimed one: its images/s including the
    start of its worker processes (each epoch starts its own), and that start (the first batch)."""
    stream = Stream(source, batch, transform, (size, size, 3), train=True, seed=0, num_workers=workers)
    for _ in stream.batches(epoch=0):  # untimed: file cache
        pass
    start = time.perf_counter()
    batches = stream.batches(epoch=1)
    count = int(next(batches)["mask"].sum())
    first_batch_s = time.perf_counter() - start
    count += sum(int(b["mask"].sum()) for b in batches)
    seconds = time.perf_counter() - start
    return {"workers": workers, "images": count, "seconds": seconds, "first_batch_s": first_batch_s,
            "images_per_s": count / seconds}


def make_step(size: int, num_classes: int, mesh):
    import optax

    from data.augment import eval_images, training_images
    from models.zoo import build_model

    model = build_model("resnet18", num_classes)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    params, model_state = variables.pop("params"), dict(variables)

    def loss_fn(params, model_state, frozen, batch, key):
        images = training_images(batch, eval_images)
        logits, updates = model.apply({"params": params, **model_state}, images, train=True,
                                      mutable=list(model_state))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, (dict(updates), {})

    optimizer = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(params, optimizer, model_state)
    return make_stream_train_step(loss_fn, optimizer, 0, 0.0, mesh), state


def step_share(source, transform, size: int, batch: int, steps: int, workers: int) -> dict:
    mesh = make_mesh()
    step, state = make_step(size, 8, mesh)
    state = put_replicated(state, mesh)  # as the trainer: one compilation for every call
    stream = Stream(source, batch, transform, (size, size, 3), train=True, seed=0, num_workers=workers)
    batches = prefetched(stream.batches(epoch=0), mesh)
    first = next(batches)
    state, metrics = step(state, None, first)  # compiles
    jax.block_until_ready(metrics)
    start, done = time.perf_counter(), 0
    for streamed in batches:
        if done == steps:
            break
        state, metrics = step(state, None, streamed)
        done += 1
    jax.block_until_ready(metrics)
    streamed_s = (time.perf_counter() - start) / done
    synthetic = to_mesh({k: np.asarray(v) for k, v in jax.device_get(first).items()}, mesh)
    start = time.perf_counter()
    for _ in range(done):
        state, metrics = step(state, None, synthetic)
    jax.block_until_ready(metrics)
    synthetic_s = (time.perf_counter() - start) / done
    return {"model": "resnet18", "batch": batch, "steps": done, "workers": workers,
            "streamed_step_s": streamed_s, "synthetic_step_s": synthetic_s,
            "loader_share": max(0.0, 1.0 - synthetic_s / streamed_s)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs")
    parser.add_argument("--size", type=int, default=224, help="training crop side")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="grain worker counts")
    parser.add_argument("--randaugment", type=int, default=1, help="1: RandAugment (2, 9); 0: off")
    parser.add_argument("--steps", type=int, default=6, help="timed ResNet-18 steps")
    parser.add_argument("--out_dir", help="results folder (default bench/results)")
    args = parser.parse_args(argv)

    transform = TrainTransform(args.size, randaugment=(2, 9) if args.randaugment else None)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, args.images)
        source = ImageFolderSource(root)
        worker = per_worker_rate(source, transform, min(args.images, 128))
        print(f"one worker (serial): {worker['images_per_s']:.1f} images/s")
        loader = [loader_throughput(source, transform, args.size, args.batch, w) for w in args.workers]
        for row in loader:
            print(f"grain, {row['workers']} worker processes: {row['images_per_s']:.1f} images/s over "
                  f"the epoch ({row['first_batch_s']:.2f} s to its first batch)")
        steps = min(args.steps, args.images // args.batch - 1)
        share = step_share(source, transform, args.size, args.batch, steps, max(args.workers))
        print(f"ResNet-18 at {args.size}, batch {args.batch}: streamed {share['streamed_step_s']:.3f} s "
              f"per step, synthetic {share['synthetic_step_s']:.3f} s; loader share "
              f"{share['loader_share']:.1%}")
    common.save("streaming", {"images": args.images, "size": args.size,
                              "transform": {"crop": "random_resized (0.08, 1)", "flip": True,
                                            "randaugment": [2, 9] if args.randaugment else None},
                              "per_worker": worker, "loader": loader, "step": share}, args.out_dir)


if __name__ == "__main__":
    main()
