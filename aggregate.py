"""Results over seeds: evaluate.py's runs of one experiment (one per training seed) as one table.

    python aggregate.py --evaluations runs/evaluate/paper_s2025 runs/evaluate/paper_s2026 \
        runs/evaluate/paper_s2027 --against EDFM --save docs/results/fmnist_paper

Inputs: evaluate.py save directories (results.json and per_example.npz) that evaluated the same
test inputs against the same teacher ensemble (same data set, test size, teacher_dir, teacher
samples and evaluation seed; checked). A method is a row name; a row present in only some
evaluations (e.g. one deep ensemble of the three seeds' students) is aggregated over those.

Written to --save (a new or empty directory; nothing is overwritten):
- results.md   the test table as mean ± std over evaluations (sample std, n - 1; n per row);
               `--against`'s paired differences in NLL and KL(teacher ‖ student) to every other
               student, two ways: paired over seeds (mean difference and a Student-t 95%
               interval with n - 1 degrees of freedom: the variation between training seeds) and
               paired over test images (each image's difference averaged over the seeds, a
               normal 95% interval over the N images: the variation between test images, the
               trained students held fixed); its members' diversity (AMB, MI) against the
               teacher's; its sweeps (members, function evaluations) as mean ± std;
- results.json every number above;
- <against>_<sweep>.png  each sweep's curves with a band of ± one std over seeds.
Negative differences favour `--against` (lower NLL, lower KL).
"""
import argparse
import json
import os

import numpy as np
from scipy import stats

from utils import plots
from utils.errors import UserError, cli_main
from utils.reporting import fmt, markdown_table, refuse_existing

# (header, key in results["methods"][name]["test"], format)
COLUMNS = (("Acc (%)", "acc", "pct"), ("NLL", "nll", "f4"), ("ECE (%)", "ece", "pct"),
           ("Brier", "brier", "f4"), ("KL to teacher", "kl_to_teacher", "f4"),
           ("Agreement (%)", "agreement", "pct"), ("AMB", "amb", "f4"), ("MI", "mi", "f4"),
           ("W2", "w2", "f4"))
PAIRED = ("nll", "kl_to_teacher")
SWEEP_METRICS = ("acc", "nll", "kl_to_teacher", "amb", "mi")
# what two evaluations must share for their numbers to be over the same test inputs and teacher
SAME = ("data_name", "num_test_examples", "teacher_dir", "teacher_samples_per_run", "teacher_mode",
        "seed", "metric_eps")


def load_evaluation(path: str) -> dict:
    results_path, per_example_path = (os.path.join(path, name) for name in ("results.json", "per_example.npz"))
    for needed in (results_path, per_example_path):
        if not os.path.exists(needed):
            raise UserError(f"{path} is not an evaluate.py save directory of this version: no "
                            f"{os.path.basename(needed)} (re-run evaluate.py into a new --save)")
    with open(results_path) as f:
        results = json.load(f)
    per_example = np.load(per_example_path)
    names = [str(n) for n in per_example["names"]]
    return {"path": path, "results": results, "labels": per_example["labels"],
            "per_example": {key: dict(zip(names, per_example[key])) for key in PAIRED}}


def check_comparable(evaluations: list):
    first = evaluations[0]
    for other in evaluations[1:]:
        for key in SAME:
            a, b = first["results"]["config"].get(key), other["results"]["config"].get(key)
            if a != b:
                raise UserError(f"{first['path']} and {other['path']} differ in {key} ({a!r} vs {b!r}): "
                                f"their numbers are not over the same test inputs and teacher")
        if not np.array_equal(first["labels"], other["labels"]):
            raise UserError(f"{first['path']} and {other['path']} evaluated different test labels")


def teacher_name(evaluation: dict) -> str:
    """The first method of an evaluation is its teacher ensemble (evaluate.py's order)."""
    return next(iter(evaluation["results"]["methods"]))


def mean_std(values) -> dict:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n": int(len(values)), "values": values.tolist()}


def table_over_seeds(evaluations: list) -> dict:
    """{method: {metric: mean_std}} over the evaluations that have the method; the teachers of
    all evaluations are one row (they are the same ensemble, checked)."""
    rows = {}
    for evaluation in evaluations:
        teacher = teacher_name(evaluation)
        for name, method in evaluation["results"]["methods"].items():
            row = rows.setdefault("Teacher" if name == teacher else name, {})
            for _, key, _ in COLUMNS:
                row.setdefault(key, []).append(method["test"].get(key))
    return {name: {key: mean_std(values) for key, values in row.items()} for name, row in rows.items()}


def interval(differences, over: str) -> dict:
    """Mean of paired differences and its 95% interval: Student-t over seeds, normal over images."""
    d = np.asarray(differences, np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "low": None, "high": None, "n": int(len(d)), "over": over}
    quantile = stats.t.ppf(0.975, len(d) - 1) if over == "seeds" else stats.norm.ppf(0.975)
    half = float(quantile * d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(d)), "over": over}


def paired_differences(evaluations: list, against: str) -> dict:
    """{baseline: {metric: {"seeds": interval, "images": interval}}}: `against` minus each other
    student, over the evaluations that have both."""
    out = {}
    teachers = {teacher_name(e) for e in evaluations}
    baselines = [n for e in evaluations for n in e["results"]["methods"] if n not in teachers and n != against]
    for baseline in dict.fromkeys(baselines):
        both = [e for e in evaluations if against in e["results"]["methods"] and baseline in e["results"]["methods"]]
        if not both:
            continue
        out[baseline] = {}
        for metric in PAIRED:
            per_seed = [e["results"]["methods"][against]["test"][metric]
                        - e["results"]["methods"][baseline]["test"][metric] for e in both]
            per_image = np.mean([e["per_example"][metric][against].astype(np.float64)
                                 - e["per_example"][metric][baseline] for e in both], axis=0)
            out[baseline][metric] = {"seeds": interval(per_seed, "seeds"),
                                     "images": interval(per_image, "images")}
    return out


def sweeps_over_seeds(evaluations: list, against: str) -> dict:
    """{sweep: {"x_label", "x": [...], metric: mean_std per x}} of `against`'s sweeps; x values
    present in every evaluation that ran the sweep."""
    out = {}
    runs = [e["results"]["sweeps"].get(against, {}) for e in evaluations]
    for sweep_name in dict.fromkeys(name for run in runs for name in run):
        sweeps = [run[sweep_name] for run in runs if sweep_name in run]
        by_x = [{p["x"]: p for p in sweep["points"]} for sweep in sweeps]
        xs = sorted(set.intersection(*(set(points) for points in by_x)))
        out[sweep_name] = {"x_label": sweeps[0]["x_label"], "x": xs, "n": len(sweeps),
                           **{m: [mean_std([points[x].get(m) for points in by_x]) for x in xs]
                              for m in SWEEP_METRICS}}
    return out


def _cell(stat: dict, kind: str) -> str:
    if stat["mean"] is None:
        return "—"
    text = fmt(stat["mean"], kind)
    return text if stat["std"] is None else f"{text} ± {fmt(stat['std'], kind)}"


def _interval_cell(stat: dict) -> str:
    if stat["low"] is None:
        return f"{stat['mean']:+.4f} (n = {stat['n']})"
    return f"{stat['mean']:+.4f} [{stat['low']:+.4f}, {stat['high']:+.4f}]"


def write_markdown(path: str, evaluations: list, table: dict, paired: dict, sweeps: dict,
                   against: str, plot_names: list):
    first = evaluations[0]["results"]
    lines = [f"# {first['config']['data_name']} over {len(evaluations)} evaluations", "",
             "From " + ", ".join(f"`{e['path']}`" for e in evaluations) + f" ({first['info']['num_test']} "
             f"test images each, one teacher ensemble). Mean ± sample std over the evaluations; n is "
             f"the number of evaluations with the row. Every number is in results.json.", ""]
    headers = ["Method", "n"] + [h for h, _, _ in COLUMNS]
    rows = [[name, max(s["n"] for s in row.values())] + [_cell(row[k], kind) for _, k, kind in COLUMNS]
            for name, row in table.items()]
    lines += [markdown_table(headers, rows), ""]
    if paired:
        lines += [f"## {against} minus each student: paired differences, 95% intervals", "",
                  "Over seeds: the per-seed differences of the test means, Student-t with n - 1 "
                  "degrees of freedom (training-seed variation). Over images: each test image's "
                  "difference averaged over the seeds, normal interval over the images (test-set "
                  "variation, the students held fixed). Negative favours " + f"{against}.", ""]
        headers = ["Baseline", "ΔNLL over seeds", "ΔNLL over images", "ΔKL over seeds", "ΔKL over images"]
        rows = [[name] + [_interval_cell(diff[m][over]) for m in PAIRED for over in ("seeds", "images")]
                for name, diff in paired.items()]
        lines += [markdown_table(headers, rows), ""]
    if against in table and "Teacher" in table:
        lines += [f"## Diversity: {against}'s members against the teacher's", ""]
        rows = [[name, _cell(table[name]["amb"], "f4"), _cell(table[name]["mi"], "f4")]
                for name in ("Teacher", against)]
        ratio = [table[against][k]["mean"] / table["Teacher"][k]["mean"]
                 if table[against][k]["mean"] and table["Teacher"][k]["mean"] else None for k in ("amb", "mi")]
        rows.append([f"ratio {against} / teacher"] + [fmt(r, "f4") if r is None else f"{r:.2f}" for r in ratio])
        lines += [markdown_table(["", "AMB", "MI"], rows), ""]
    for sweep_name, sweep in sweeps.items():
        lines += [f"## {against}: {sweep_name} (n = {sweep['n']})", ""]
        rows = [[x] + [_cell(sweep[m][i], "pct" if m == "acc" else "f4") for m in SWEEP_METRICS]
                for i, x in enumerate(sweep["x"])]
        lines += [markdown_table([sweep["x_label"], "Acc (%)", "NLL", "KL to teacher", "AMB", "MI"], rows), ""]
    lines += [f"![{name}]({name})" for name in plot_names]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(save: str, sweeps: dict, table: dict, against: str) -> list:
    names = []
    teacher = table.get("Teacher", {})
    reference = {"label": "teacher", **{m: teacher[m]["mean"] for m in SWEEP_METRICS if m in teacher}}
    for sweep_name, sweep in sweeps.items():
        curve = {"x": sweep["x"]}
        for m in SWEEP_METRICS:
            curve[m] = [s["mean"] if s["mean"] is not None else np.nan for s in sweep[m]]
            curve[f"{m}_std"] = [s["std"] or 0.0 for s in sweep[m]]
        name = plots.sweep_file_name(against, sweep_name)
        xs = sweep["x"]
        plots.sweep_plot(os.path.join(save, name), {f"{against} (mean ± std, n = {sweep['n']})": curve},
                         sweep["x_label"], SWEEP_METRICS, reference=reference,
                         logx=plots.wide_range(xs),
                         title=f"{against}: {sweep_name} over {sweep['n']} seeds")
        names.append(name)
    return names


def aggregate(evaluation_dirs: list, against: str, save: str) -> dict:
    refuse_existing(save)
    evaluations = [load_evaluation(path) for path in evaluation_dirs]
    check_comparable(evaluations)
    if not any(against in e["results"]["methods"] for e in evaluations):
        raise UserError(f"no evaluation has a method named {against!r} (--against); they have "
                        f"{sorted({n for e in evaluations for n in e['results']['methods']})}")
    table = table_over_seeds(evaluations)
    paired = paired_differences(evaluations, against)
    sweeps = sweeps_over_seeds(evaluations, against)
    os.makedirs(save, exist_ok=True)
    plot_names = write_plots(save, sweeps, table, against)
    write_markdown(os.path.join(save, "results.md"), evaluations, table, paired, sweeps, against, plot_names)
    out = {"evaluations": evaluation_dirs, "against": against, "table": table, "paired": paired,
           "sweeps": sweeps, "plots": plot_names}
    with open(os.path.join(save, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


@cli_main
def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", nargs="+", required=True, help="evaluate.py save directories")
    parser.add_argument("--against", default="EDFM", help="the method compared with every other student")
    parser.add_argument("--save", required=True, help="a new or empty directory")
    args = parser.parse_args(argv)
    out = aggregate(args.evaluations, args.against, args.save)
    with open(os.path.join(args.save, "results.md")) as f:
        print(f.read())
    return out


if __name__ == "__main__":
    main()
