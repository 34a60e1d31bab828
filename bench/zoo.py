"""The model zoo's cost: parameters, FLOPs per input and forward latency of every member.

    python bench/zoo.py                       # every zoo member, batch 64, CIFAR-100 or ImageNet shape
    python bench/zoo.py --models resnet8x4,wrn_16_2 --batch 16 --repeats 5
    python bench/zoo.py --train --models resnet18,resnet50 --batch 128 [--dtype bfloat16]

Each member is built as a converted or trained export rebuilds it (models.zoo.build_model), with
its data set's input (32x32x3 for the CIFAR members, 224x224x3 for the ImageNet ones) and classes
(100 and 1000). FLOPs come from XLA's cost analysis of the compiled eval-mode forward (per input:
the batch's count over the batch); latency is utils/cost.measure_latency's median over `repeats`
calls after `warmup`, each ended by block_until_ready. Writes bench/results/zoo-<platform>.json.

`--train` times a training step instead, on synthetic data (ImageNet shape for the ImageNet
members: 224x224x3, 1000 classes): `jax.value_and_grad` of the mean cross-entropy in train mode
(BatchNorm on batch statistics, its running statistics updated) and an optax SGD update
(momentum 0.9), jitted with the state donated and threaded through the timed calls. `--dtype`
is the compute dtype (parameters, gradients and optimizer state stay float32). Per model:
`step_ms`, `images_per_s`, `flops_per_step` (XLA's cost analysis of the step), and `mfu` =
flops_per_step / step time / the device's peak (bench/common.py's table, as bench/throughput.py;
null on CPU without --peak_flops). Writes bench/results/zoo_train[-bfloat16]-<platform>.json.
"""
import argparse
from typing import Optional

from common import device_description, peak_flops, print_rows, ratio, save

import jax
import jax.numpy as jnp
import numpy as np

from models.zoo import build_model, model_names
from utils.cost import measure_latency, xla_flops
from utils.predict import count_params


IMAGENET = "imagenet2012"  # the ImageNet members' default_data_name


def measure(name: str, batch: int, repeats: int, warmup: int) -> dict:
    imagenet = getattr(build_model(name, 10), "default_data_name", None) == IMAGENET
    model = build_model(name, 1000 if imagenet else 100)
    size = 224 if imagenet else 32
    shape = (size, size, len(model.pixel_mean))
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, *shape)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
    forward = jax.jit(lambda v, x: model.apply(v, x))
    compiled = forward.lower(variables, images).compile()
    flops = xla_flops(forward, variables, images)
    latency = measure_latency(compiled, variables, images, warmup=warmup, repeats=repeats, jit=False)
    return {"input": list(shape), "classes": model.num_classes,
            "params": count_params(variables["params"]),
            "flops_per_input": flops.flops / batch,
            "latency_ms_per_batch": 1e3 * latency["median_s"],
            "images_per_s": batch / latency["median_s"]}


def measure_train(name: str, batch: int, repeats: int, warmup: int, dtype: str,
                  peak: Optional[float]) -> dict:
    """One SGD training step of zoo member `name` on a synthetic batch (see the docstring)."""
    import optax

    imagenet = getattr(build_model(name, 10), "default_data_name", None) == IMAGENET
    num_classes = 1000 if imagenet else 100
    model = build_model(name, num_classes, dtype=jnp.dtype(dtype))
    size = 224 if imagenet else 32
    shape = (size, size, len(model.pixel_mean))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}  # batch_stats
    optimizer = optax.sgd(0.1, momentum=0.9)

    def loss_fn(params, others, images, labels):
        logits, updated = model.apply({"params": params, **others}, images, train=True,
                                      mutable=list(others))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updated

    def step(state, images, labels):
        params, others, opt_state = state
        (loss, others), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, others, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), dict(others), opt_state), loss

    state = (params, others, optimizer.init(params))
    jitted = jax.jit(step, donate_argnums=0)
    compiled = jitted.lower(state, images, labels).compile()
    flops = xla_flops(step, state, images, labels).flops

    def call(_images, _labels):  # the donated state threaded through the calls, as in training
        nonlocal state
        state, loss = compiled(state, _images, _labels)
        return state, loss

    latency = measure_latency(call, images, labels, warmup=warmup, repeats=repeats, jit=False)
    step_s = latency["median_s"]
    return {"input": list(shape), "classes": num_classes, "dtype": dtype, "batch": batch,
            "params": count_params(params), "flops_per_step": flops, "step_ms": 1e3 * step_s,
            "images_per_s": batch / step_s, "achieved_flops_per_s": flops / step_s,
            "mfu": ratio(flops / step_s, peak), "times_s": latency["times_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--train", action="store_true",
                        help="time an SGD training step (value_and_grad + update) instead of a forward")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--train: compute dtype (parameters stay float32)")
    parser.add_argument("--peak_flops", type=float, help="--train: peak FLOP/s of one device (for MFU)")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else model_names()
    if args.train:
        return train_main(names, args)
    print(f"{device_description()}: forward of batch {args.batch}, median of {args.repeats}")
    rows = {name: measure(name, args.batch, args.repeats, args.warmup) for name in names}
    print_rows("zoo", rows, {"params": ",", "flops_per_input": ".3g", "latency_ms_per_batch": ".1f",
                             "images_per_s": ".0f"})
    return save("zoo", {"batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                        "models": rows}, args.out_dir)


def train_main(names, args):
    peak, peak_source = peak_flops(args.dtype, args.peak_flops)
    print(f"{device_description()}: training step of batch {args.batch} ({args.dtype}), "
          f"median of {args.repeats}")
    rows = {name: measure_train(name, args.batch, args.repeats, args.warmup, args.dtype, peak)
            for name in names}
    print_rows("zoo training step", rows, {"flops_per_step": ".3e", "step_ms": ".2f",
                                           "images_per_s": ".0f", "mfu": ".3f"})
    name = "zoo_train" + ("-bfloat16" if args.dtype == "bfloat16" else "")
    return save(name, {"batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                       "dtype": args.dtype, "optimizer": "optax.sgd(0.1, momentum=0.9)",
                       "peak_flops_per_device": peak, "peak_source": peak_source, "models": rows},
                args.out_dir)


if __name__ == "__main__":
    main()
