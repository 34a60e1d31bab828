"""(a) Training throughput of the real train steps of sgd_swag.py, kd_and_endd.py (KD and
ProxyEnDD), fed.py, hydra.py and edfm.py.

    python bench/throughput.py --preset c10 [--dtype bfloat16] [--methods sgd_swag kd endd fed hydra edfm]
    python bench/throughput.py --preset c100
    python bench/throughput.py --depth 8 --width 1 --batch 8 --size 16 --num_images 64 \
        --num_teachers 2 --repeats 2          # a tiny smoke run

Each step is built as its script builds it (bench/common.build_step: the script's config from
the preset's YAML, its make_loss_fn and optimizer, utils.trainer.make_train_step on a mesh over
all devices, a generated uint8 training set on the devices, generated MultiSWAG teacher moments)
and timed as the Trainer calls it, with the donated state threaded through the calls.
Presets: c10 = ResNet-32x2 FRN-Swish, 10 classes; c100 = ResNet-32x4, 100 classes; 32x32x3
images, batch 128 (--batch); KD and ProxyEnDD draw the config's 30 teacher members per step,
FED 8 (and its student runs each image with 8 noise draws), Hydra one member per head (8 heads
on a shared body), EDFM one member plus the frozen backbone (the same ResNet) and trains an
AdaLN MLP head.

Reading the output, per method: `median_s` seconds per step (median over --repeats, after
warm-up, each call ended by block_until_ready), `images_per_s` = batch / median_s,
`flops_per_step` from XLA's cost analysis of the step (all devices; every scan iteration counted),
`achieved_flops_per_s` = flops_per_step / median_s, and `mfu` = achieved / (peak per device ×
devices). The peak comes from a table of known devices by device_kind and precision (bfloat16
with --dtype bfloat16, else TF32, JAX's default precision for float32 convolutions on NVIDIA
GPUs), or from --peak_flops (FLOP/s of one device); on CPU `mfu` is null without --peak_flops.
Only ratios measured in the same run (`relative_step_time`, step time / sgd_swag's) should be
compared across methods.
"""
import argparse

import common


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    common.add_run_args(parser)
    parser.add_argument("--methods", nargs="+", choices=common.METHODS, default=list(common.METHODS))
    parser.add_argument("--peak_flops", type=float, help="peak FLOP/s of one device (for MFU)")
    parser.add_argument("--skip_flops", action="store_true", help="no FLOP count (saves a compile)")
    args = parser.parse_args(argv)

    peak, peak_source = common.peak_flops(args.dtype, args.peak_flops)
    results = {}
    for method in args.methods:
        bench = common.build_step(method, args)
        compiled = common.compile_step(bench)
        timing = common.time_step(bench, compiled, args.repeats, args.warmup)
        row = {"batch": bench.batch_size, "devices": bench.mesh.size, **timing,
               "images_per_s": bench.batch_size / timing["median_s"]}
        if not args.skip_flops:
            row.update(common.step_flops(bench))
            row["achieved_flops_per_s"] = row["flops_per_step"] / timing["median_s"]
            row["mfu"] = common.ratio(row["achieved_flops_per_s"],
                                      peak * bench.mesh.size if peak else None)
        results[method] = row
        del bench
    first = results[args.methods[0]]["median_s"]
    for row in results.values():
        row["relative_step_time"] = row["median_s"] / first

    common.print_rows(f"train steps ({args.preset}, batch {args.batch}, {args.dtype})", results, {
        "median_s": ".4g", "images_per_s": ".1f", "flops_per_step": ".3e", "mfu": ".3f"})
    common.save(common.result_name("throughput", args), {
        "config": vars(args), "peak_flops_per_device": peak, "peak_source": peak_source,
        "relative_to": args.methods[0], "steps": results}, args.out_dir)
    return results


if __name__ == "__main__":
    main()
