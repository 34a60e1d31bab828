"""The training steps of bench/throughput.py at this checkout against an older commit's, on the
same machine: is any step slower than it was?

    python bench/throughput_vs_commit.py --base 288fdd5 --rounds 3 -- \
        --preset c10 --batch 32 --repeats 5 --warmup 2 --methods sgd_swag kd edfm --skip_flops

The older commit is checked out in a temporary git worktree (removed afterwards) and both run
the same `bench/throughput.py` arguments (those after `--`) in processes of their own, taking
turns, base first, for `--rounds` rounds: this machine's speed drifts between runs (the same
step measured 1.74 s one day and 2.4 s another), so only ratios of runs made side by side mean
anything. Per method: the median over rounds of each process's median step time, and
`speedup` = base / this checkout (above 1: faster now). Both use this interpreter; the base
must have a bench/throughput.py that takes those arguments. Writes
`throughput_vs_commit-<platform>.json` (common.save).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import common


def run_throughput(root: str, argv: list, out_dir: str) -> dict:
    """bench/throughput.py of the checkout at `root` -> {method: median_s}."""
    subprocess.run([sys.executable, os.path.join(root, "bench", "throughput.py"), *argv, "--out_dir", out_dir],
                   cwd=root, check=True, stdout=subprocess.DEVNULL)
    (name,) = [f for f in os.listdir(out_dir) if f.startswith("throughput-") and f.endswith(".json")]
    with open(os.path.join(out_dir, name)) as f:
        return {method: row["median_s"] for method, row in json.load(f)["steps"].items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the older commit (anything git rev-parse takes)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each checkout")
    parser.add_argument("--out_dir", default=None,
                        help="where the JSON goes (default $BENCH_RESULTS_DIR or bench/results)")
    parser.add_argument("throughput_args", nargs=argparse.REMAINDER,
                        help="-- then bench/throughput.py's arguments")
    args = parser.parse_args(argv)
    throughput_args = args.throughput_args[1:] if args.throughput_args[:1] == ["--"] else args.throughput_args
    found = subprocess.run(["git", "-C", common.ROOT, "rev-parse", "--verify", f"{args.base}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        parser.error(f"--base {args.base} is not a commit of this repository")
    base = found.stdout.strip()
    head = subprocess.run(["git", "-C", common.ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()

    times = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as scratch:
        worktree = os.path.join(scratch, "base")
        subprocess.run(["git", "-C", common.ROOT, "worktree", "add", "--detach", "-q", worktree, base], check=True)
        try:
            for i in range(args.rounds):
                for build, root in (("base", worktree), ("this", common.ROOT)):
                    times[build].append(run_throughput(root, throughput_args, os.path.join(scratch, f"{build}-{i}")))
                    print(f"round {i + 1}/{args.rounds} {build}: " + ", ".join(
                        f"{m} {s:.4g} s" for m, s in times[build][-1].items()), flush=True)
        finally:
            subprocess.run(["git", "-C", common.ROOT, "worktree", "remove", "--force", worktree], check=False)

    methods = {}
    for method in times["this"][0]:
        base_s = statistics.median(run[method] for run in times["base"])
        this_s = statistics.median(run[method] for run in times["this"])
        methods[method] = {"base_median_s": base_s, "this_median_s": this_s, "speedup": base_s / this_s,
                           "base_runs_s": [run[method] for run in times["base"]],
                           "this_runs_s": [run[method] for run in times["this"]]}
    common.print_rows(f"median step, {base[:9]} against this checkout ({head[:9]})", methods, {
        "base_median_s": ".4g", "this_median_s": ".4g", "speedup": ".2f"})
    common.save("throughput_vs_commit", {"base": base, "this": head, "rounds": args.rounds,
                                         "throughput_args": throughput_args, "methods": methods}, args.out_dir)
    return methods


if __name__ == "__main__":
    main()
