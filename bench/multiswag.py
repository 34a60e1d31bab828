"""MultiSWAG runs trained together (sgd_swag.train_together) against the same runs one after
the other: runs x images per second of R runs' training steps.

    python bench/multiswag.py --preset c10 --runs 4 --batch 128
    python bench/multiswag.py --preset c10 --depth 8 --width 1 --size 28 --runs 2 --batch 32 \
        --num_images 256 --repeats 3   # a CPU smoke run

The steps are the preset's sgd_swag config built by sgd_swag.build (seeds seed..seed+R-1) on a
generated uint8 set. `together`: one call of utils.trainer.make_runs_train_step (vmap over the
runs on accelerators, lax.map on the CPU; --vectorize forces either); `sequential`: R calls of
the ordinary make_train_step, one per run, as R separate runs execute them. Each timing is the
median of --repeats calls after --warmup (block_until_ready; bench/common.py's helpers).
Results: bench/results/multiswag-<preset>[-bfloat16]-R<runs>-<platform>.json.
"""
import argparse
import dataclasses

import common  # noqa: F401 -- the repository on sys.path

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(parser)
    common.add_run_args(parser)
    parser.add_argument("--runs", type=int, default=4, help="R, the MultiSWAG runs")
    parser.add_argument("--vectorize", choices=("auto", "vmap", "map"), default="auto",
                        help="how the runs share the program (auto: vmap off the CPU)")
    args = parser.parse_args(argv)

    from utils.cost import measure_latency
    from utils.trainer import (make_mesh, make_runs_train_step, make_train_step, put_replicated,
                               replicated, stack_runs, to_global)

    spec, _ = common.data_spec(args)
    config, method = common.preset_config("sgd_swag", args)
    num_images = args.num_images or spec.num_train
    dataset = common.generated_dataset(args, num_images)
    mesh = make_mesh(jax.devices()[:1])  # the runs axis is the parallelism: one device
    seeds = [config.seed + r for r in range(args.runs)]
    runs = [method.build(dataclasses.replace(config, seed=s), dataset) for s in seeds]
    on_mesh = lambda x: to_global(np.asarray(x), replicated(mesh))
    images, labels = on_mesh(dataset.train.images), on_mesh(dataset.train.labels)
    rng = np.random.default_rng(0)
    indices = np.stack([rng.permutation(num_images)[:config.optim_bs] for _ in seeds]).astype(np.int32)
    masks = np.ones(indices.shape, bool)
    vectorize = {"auto": None, "vmap": True, "map": False}[args.vectorize]

    together = make_runs_train_step(runs[0].loss_fn, runs[0].optimizer, 0.0, mesh, vectorize)
    state = {"together": put_replicated(stack_runs([r.state for r in runs]), mesh)}
    together_args = (on_mesh(np.asarray(seeds, np.int32)), None, images, labels,
                     on_mesh(indices), on_mesh(masks))

    def call_together():
        state["together"], metrics = together(state["together"], *together_args)
        return state["together"], metrics

    single = make_train_step(runs[0].loss_fn, runs[0].optimizer, config.seed, 0.0, mesh)
    states = [put_replicated(r.state, mesh) for r in runs]
    single_args = [(None, images, labels, on_mesh(indices[r]), on_mesh(masks[r]))
                   for r in range(args.runs)]

    def call_sequential():
        out = []
        for r in range(args.runs):
            states[r], metrics = single(states[r], *single_args[r])
            out.append(metrics)
        return states, out

    results = {"preset": args.preset, "runs": args.runs, "batch": config.optim_bs,
               "model": f"ResNet-{config.model_depth}x{config.model_width}", "size": args.size,
               "vectorize": args.vectorize if vectorize is not None else
               ("vmap" if jax.default_backend() != "cpu" else "map")}
    for name, fn in (("together", call_together), ("sequential", call_sequential)):
        timing = common.summary(measure_latency(fn, repeats=args.repeats, warmup=args.warmup,
                                                jit=False))
        timing["runs_images_per_s"] = args.runs * config.optim_bs / timing["median_s"]
        results[name] = timing
    results["speedup"] = common.ratio(results["together"]["runs_images_per_s"],
                                      results["sequential"]["runs_images_per_s"])
    for name in ("together", "sequential"):
        print(f"{name:>10}: {results[name]['runs_images_per_s']:.1f} runs x images/s "
              f"(median {results[name]['median_s'] * 1e3:.1f} ms per step of {args.runs} runs)")
    common.save(f"{common.result_name('multiswag', args)}-R{args.runs}", results, args.out_dir)


if __name__ == "__main__":
    main()
