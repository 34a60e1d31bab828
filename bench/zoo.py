"""The model zoo's cost: parameters, FLOPs per input and forward latency of every member.

    python bench/zoo.py                       # every zoo member, batch 64, CIFAR-100 or ImageNet shape
    python bench/zoo.py --models resnet8x4,wrn_16_2 --batch 16 --repeats 5

Each member is built as a converted or trained export rebuilds it (models.zoo.build_model), with
its data set's input (32x32x3 for the CIFAR members, 224x224x3 for the ImageNet ones) and classes
(100 and 1000). FLOPs come from XLA's cost analysis of the compiled eval-mode forward (per input:
the batch's count over the batch); latency is utils/cost.measure_latency's median over `repeats`
calls after `warmup`, each ended by block_until_ready. Writes bench/results/zoo-<platform>.json.
"""
import argparse

from common import device_description, print_rows, save

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
    flops = xla_flops(forward, variables, images, compiled=compiled)
    latency = measure_latency(compiled, variables, images, warmup=warmup, repeats=repeats, jit=False)
    return {"input": list(shape), "classes": model.num_classes,
            "params": count_params(variables["params"]),
            "flops_per_input": flops.flops / batch,
            "latency_ms_per_batch": 1e3 * latency["median_s"],
            "images_per_s": batch / latency["median_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out_dir", default=None)
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else model_names()
    print(f"{device_description()}: forward of batch {args.batch}, median of {args.repeats}")
    rows = {name: measure(name, args.batch, args.repeats, args.warmup) for name in names}
    print_rows("zoo", rows, {"params": ",", "flops_per_input": ".3g", "latency_ms_per_batch": ".1f",
                             "images_per_s": ".0f"})
    return save("zoo", {"batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                        "models": rows}, args.out_dir)


if __name__ == "__main__":
    main()
