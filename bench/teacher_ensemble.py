"""(c) The teacher ensemble in one compiled call against a Python loop over members.

    python bench/teacher_ensemble.py [--members 30] [--batch 256] [--depth 32 --width 2 --classes 10]

Times, for M SWAG members on one batch: `vmap` over all members; `lax.map` (members in sequence
inside one compiled call; what utils/teachers.py uses on CPU); and a Python loop calling a
jitted single-member forward M times. Reports medians and the ratios measured in this run.
"""
import argparse

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp

from models.resnet import ResNet
from utils.cost import measure_latency
from utils.teachers import ensemble_logits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = ResNet(args.classes, depth=args.depth, width=args.width)
    images = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    params = model.init(jax.random.PRNGKey(1), images[:1])["params"]
    members = jax.tree.map(lambda p: p[None] + 0.01 * jax.random.normal(
        jax.random.PRNGKey(2), (args.members, *p.shape)), params)

    vmapped = jax.jit(lambda m, x: ensemble_logits(model, m, x, chunk=None))
    sequential = jax.jit(lambda m, x: ensemble_logits(model, m, x, chunk=1))
    single = jax.jit(lambda p, x: model.apply({"params": p}, x))
    member_list = [jax.tree.map(lambda p, i=i: p[i], members) for i in range(args.members)]

    def python_loop(_, x):
        return jnp.stack([single(p, x) for p in member_list])

    results = {name: measure_latency(fn, members, images, repeats=args.repeats, jit=False)
               for name, fn in [("vmap", vmapped), ("lax_map", sequential), ("python_loop", python_loop)]}
    loop = results["python_loop"]["median_s"]
    common.save("teacher_ensemble", {
        "config": vars(args), "timings": results,
        "speedup_vs_python_loop": {k: loop / v["median_s"] for k, v in results.items()},
    })


if __name__ == "__main__":
    main()
