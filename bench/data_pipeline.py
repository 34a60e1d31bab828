"""(d) The data pipeline's share of a training step: input pipeline time / KD train step time.

    python bench/data_pipeline.py --preset c10 [--methods kd edfm] [--dtype bfloat16]
    python bench/data_pipeline.py --preset c100

The pipeline is what every distillation step does to its input, as one jitted function: the
index gather from the on-device uint8 training set (as utils.trainer.make_train_step gathers
it, batch sharded along `data`), then data.augment.student_pipeline (per-image RandAugment(2, 9),
pad-crop, flip, /255) and mixup, with the config's mixup_alpha. The step is the full train step
of the script (bench/common.build_step), which contains that same pipeline. Both are timed in
this run on the same batch (utils.cost.measure_latency: warm-up, block_until_ready, median).

Reading the output, per method: `pipeline_median_s`, `step_median_s`, and `pipeline_share` =
pipeline_median_s / step_median_s (target for KD: <= 0.10). The share is an upper bound of what
the pipeline costs inside the step, where XLA may overlap or fuse it with the rest.
"""
import argparse

import common
import jax

from data.augment import student_pipeline
from utils.cost import measure_latency
from utils.trainer import batch_sharded

TARGET_SHARE = 0.10


def make_pipeline(config, mesh):
    """(images, labels, indices, mask, key) -> (augmented float images, labels), jitted."""
    sharding = batch_sharded(mesh)

    def pipeline(images, labels, indices, mask, key):
        batch = {"images": images[indices], "labels": labels[indices], "mask": mask}
        batch = jax.lax.with_sharding_constraint(batch, sharding)
        return student_pipeline(key, batch, mixup_alpha=config.mixup_alpha)

    return jax.jit(pipeline)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    common.add_run_args(parser)
    parser.add_argument("--methods", nargs="+", choices=("kd", "edfm"), default=["kd"])
    args = parser.parse_args(argv)

    results = {}
    for method in args.methods:
        bench = common.build_step(method, args)
        _, images, labels, indices, mask = bench.args
        pipeline = common.summary(measure_latency(
            make_pipeline(bench.config, bench.mesh), images, labels, indices, mask,
            jax.random.PRNGKey(0), repeats=args.repeats, warmup=args.warmup))
        step = common.time_step(bench, common.compile_step(bench), args.repeats, args.warmup)
        share = pipeline["median_s"] / step["median_s"]
        results[method] = {"batch": bench.batch_size, "devices": bench.mesh.size,
                           "pipeline_median_s": pipeline["median_s"], "step_median_s": step["median_s"],
                           "pipeline_share": share, "meets_target": share <= TARGET_SHARE,
                           "pipeline": pipeline, "step": step}
        del bench

    common.print_rows(f"input pipeline vs train step ({args.preset}, batch {args.batch})", results,
                      {"pipeline_median_s": ".4g", "step_median_s": ".4g", "pipeline_share": ".3f"})
    common.save(common.result_name("data_pipeline", args), {
        "config": vars(args), "target_share": TARGET_SHARE, "methods": results}, args.out_dir)
    return results


if __name__ == "__main__":
    main()
