"""(e) Peak device memory of the train steps of sgd_swag.py, kd_and_endd.py (KD) and edfm.py.

    python bench/memory.py --preset c10 [--dtype bfloat16] [--methods sgd_swag kd edfm]
    python bench/memory.py --preset c100

Per method, the step is built as its script builds it (bench/common.build_step, the same as
bench/throughput.py) and compiled ahead of time, then run --steps times.

Reading the output, per method, in MiB of ONE device (the step is data-parallel: every device
holds the replicated state, teachers and data set, and its slice of the batch):
- `xla`: `compiled.memory_analysis()`, XLA's buffer assignment: `argument` (train state, frozen
  teachers/backbone, the uint8 training set, the batch's indices), `output`, `alias` (outputs
  written into donated inputs: the new state), `temp` (activations, gradients, scratch), and
  `peak_estimate` = argument + output − alias + temp.
- `device`: on accelerators, the allocator's `peak_bytes_in_use` after running the step (what the
  process really held at most: the program's buffers plus everything else alive), with
  `bytes_in_use` and `bytes_limit`. Null on CPU. The peak counter cannot be reset, so with more
  than one method each method runs in its own child process (the same flags, one method).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import common
import jax


def measure(method: str, args) -> dict:
    bench = common.build_step(method, args)
    compiled = common.compile_step(bench)
    for _ in range(max(1, args.steps)):
        bench.state, metrics = compiled(bench.state, *bench.args)
    jax.block_until_ready((bench.state, metrics))
    return {"batch": bench.batch_size, "devices": bench.mesh.size,
            "xla": common.memory_analysis_mib(compiled), "device": common.device_memory_mib()}


def in_child(method: str, argv) -> dict:
    """`measure` in a fresh process, so that its peak counter sees this method only."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--methods", method,
                        "--child_out", out], check=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--out_dir", default=None,
                        help="where the JSON goes (default $BENCH_RESULTS_DIR or bench/results)")
    parser.add_argument("--methods", nargs="+", choices=common.METHODS, default=list(common.METHODS))
    parser.add_argument("--steps", type=int, default=2, help="steps run before reading the peak")
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_out:
        with open(args.child_out, "w") as f:
            json.dump(measure(args.methods[0], args), f)
        return None
    # Decided before this process touches a device (on a GPU, it would reserve the memory).
    isolate = len(args.methods) > 1
    results = {m: in_child(m, argv) if isolate else measure(m, args) for m in args.methods}

    rows = {m: {**(r["xla"] or {}), "device_peak": (r["device"] or {}).get("peak_in_use")}
            for m, r in results.items()}
    common.print_rows(f"train step memory per device, MiB ({args.preset}, batch {args.batch})", rows,
                      {"argument": ".1f", "temp": ".1f", "peak_estimate": ".1f", "device_peak": ".1f"})
    config = {k: v for k, v in vars(args).items() if k != "child_out"}
    common.save(common.result_name("memory", args), {
        "config": config, "unit": "MiB per device", "isolated": isolate, "steps": results},
        args.out_dir)
    return results


if __name__ == "__main__":
    main()
