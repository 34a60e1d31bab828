"""Evaluate a teacher ensemble and any set of distilled students on one data set (spec §8).

    python evaluate.py --config config/evaluate/fmnist.yaml --save runs/evaluate/fmnist
    python evaluate.py --data_name FashionMNIST_x28 --teacher_dir checkpoints_teacher/fmnist \
        --students KD=runs/kd/x,EDFM=runs/edfm/y --num_test_examples 2000 --save DIR

Inputs
- the data set: `data_name`, `data_root` (flags, or `--config` with any YAML that has them: an
  evaluate config is read strictly; another script's config, e.g. a training YAML, lends only its
  data_name, data_root, download and teacher_dir);
- `teacher_dir`: a folder of MultiSWAG runs (or one run); the teacher ensemble is
  R runs x `teacher_samples_per_run` SWAG samples, drawn once with `seed`, or with
  `teacher_mode: swa_means` the R runs' SWA means (the reference's offline evaluation);
- `students`: in YAML `students: [{name: KD, path: runs/kd/x, options: {...}}]`, on the command
  line `--students name=path,name=path` (or the YAML list inline). `path` is a run directory or
  its `model/` export; `options` go to the method's load_predictor (e.g. EDFM
  `{num_members: 32}`). The export's sidecar kind says which method predicts with it (the
  registry, utils/method.py). `ensemble: [path, ...]` instead of `path` pools the members of
  several exports of one method (a deep ensemble of students, e.g. three KD seeds). `sweeps:`
  replaces the method's default sweep lists (e.g. EDFM `{members: [1, 8, 32]}`), `false` skips
  them.

The data set is utils.data_loading.load_data's: the registry's small sets on the devices, the
catalog's large ones (imagenet2012, ImageNet_LT, `tfds:<name>`, `folder:<path>`, ...; data/catalog.py)
streamed through grain with `input_pipeline`, `image_size`, `eval_crop_fraction`, `data_workers`,
`eval_data_name` as in the training scripts; `long_tail_ratio` makes an on-device training split
long-tailed, and `shot_thresholds: [many, few]` adds many-, medium- and few-shot accuracy (classes
grouped by their number of training images; utils.metrics.shot_accuracies).

Every method is evaluated on the test split (the first `num_test_examples` when set, on-device
sets only) and on every shift and OOD set available for the data set (data/shift.py: the
Fashion-MNIST corruption suite and the digits OOD set; CIFAR's .npy sets when present), plus the
streamed catalog sets named by `shift_data` (labelled, the data set's classes; e.g.
`[tfds:cifar10_corrupted/gaussian_noise_5, tfds:cifar10_1]`) and `ood_data` (labels unused; e.g.
`[tfds:svhn_cropped]`): each one's test split (its val split when it has no test split), in the
data set's channels, through the evaluation transform at the data set's image size (resize and
centre crop by `eval_crop_fraction` when the data set streams; resize only, crop fraction 1,
when it sits on the devices, whose test images are used as they are). `eval_shift: false` skips
every shift and OOD set. Written to `--save DIR` (a new or empty directory; nothing is
overwritten):
- results.md   the main table (rows methods; accuracy, top-5 accuracy with more than 5 classes,
               the shot groups with shot_thresholds, calibration, fidelity to the teacher,
               diversity, W2, OOD AUROC, mean shift accuracy / NLL, cost), a table per shift set,
               the OOD sets and each student's sweeps (its method's hook: EDFM members and
               function evaluations, GenDD sampling steps and guidance);
- results.json every number, with the resolved config and timings;
- per_example.npz  the test split's per-input NLL and KL to the teacher of every method
               (`names` [methods], `nll`, `kl_to_teacher` [methods, N], `labels` [N]): what
               aggregate.py pairs over the same test images;
- reliability.png, diversity_vs_accuracy.png, and a <student>_<sweep>.png per sweep.

The stages (predict, metrics, shift and OOD, cost, sweeps, plots) name no method; the metrics
are utils/evaluation.py's, which every training script's end-of-run table uses too.
Definitions (utils/metrics.py): the ensemble prediction is the mean of the members' softmax;
NLL with eps 0; ECE with 15 bins; KL(teacher mean || student mean) and top-1 agreement with the
teacher ensemble; AMB (logit averaging), Brier variance, mutual information, disagreement; W2
between the teacher's and the student's per-input sets of centred member logits (defined for a
single-member student too; the member-diversity columns are "—" for one member); OOD AUROC with OOD as the positive class, scored by the predictive
entropy or the mutual information. Cost (utils/cost.py): parameters used at prediction, FLOPs
per input from XLA's cost analysis of the compiled prediction on one batch (every loop
iteration counted), and the median latency of one batch after warm-up on one device.
"""
import dataclasses
import datetime
import difflib
import json
import os
import time
from typing import List, Optional

import jax
import numpy as np
import yaml

from data import catalog, datasets
from data.datasets import Split
from data.shift import ShiftSets, load_shift_sets
from data.stream import Stream
from utils import metrics, plots
from utils.config import CommonConfig, _read_yaml, parse_config, prepare_run_dir
from utils.cost import predictor_cost
from utils.data_loading import load_data, shot_groups
from utils.errors import UserError, cli_main
from utils.evaluation import check_classes, ensemble_summary, ood_aurocs, uncertainty_scores
from utils.method import register_config
from utils.predict import Runner, check_options, ensemble_predictor, load_predictor
from utils.reporting import fmt, markdown_table, refuse_existing
from utils.teachers import configured_teacher, find_teacher_runs
from utils.trainer import make_mesh


@dataclasses.dataclass
class EvaluateConfig(CommonConfig):
    teacher_dir: str = "checkpoints_teacher/fmnist"  # the teacher ensemble (folder of runs): KL/W2 reference
    teacher_samples_per_run: int = 3  # SWAG samples per teacher run in the evaluated ensemble
    # read by parse_evaluate_config: the YAML list of {name, path | ensemble, options, sweeps}
    students: list = dataclasses.field(default_factory=list)  # students: name=path,name=path,...
    eval_bs: int = 500  # inputs per prediction batch
    num_test_examples: Optional[int] = None  # first N of the test split and each shift/OOD set (on-device)
    eval_shift: bool = True  # also the shift and OOD sets (data/shift.py's, shift_data, ood_data)
    # e.g. shift_data [tfds:cifar10_corrupted/gaussian_noise_5, tfds:cifar10_1], ood_data [tfds:svhn_cropped]
    shift_data: List[str] = dataclasses.field(default_factory=list)  # streamed sets' test splits as shift sets (the data set's classes)
    ood_data: List[str] = dataclasses.field(default_factory=list)  # streamed sets' test splits as OOD sets (labels unused)
    w2: bool = True  # the W2 column (exact assignment per input; the slowest metric)
    metric_eps: float = 0.0  # added to p_y inside the logs of NLL and AMB; the EDFM reference's evaluation: 1e-5
    sweeps: bool = True  # each student's sweeps (its method's hook; per student `sweeps:`)
    latency_bs: Optional[int] = None  # batch of the latency column; default eval_bs
    latency_repeats: int = 10  # timed calls; the median is reported
    latency_warmup: int = 2  # untimed calls first (the first one compiles)

    def validate(self):
        super().validate()
        if not 0.0 <= self.metric_eps < 1.0:
            raise UserError(f"metric_eps must be in [0, 1), got {self.metric_eps}")
        for key in ("teacher_samples_per_run", "eval_bs", "latency_repeats"):
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        if self.latency_warmup < 0:
            raise UserError(f"latency_warmup must be >= 0, got {self.latency_warmup}")
        for key in ("num_test_examples", "latency_bs"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1 or null, got {getattr(self, key)}")
        for key in ("shift_data", "ood_data"):
            names = getattr(self, key)
            for name in names:
                if not catalog.is_streamed(name):
                    raise UserError(
                        f"{key}: {name!r} is not a streamed data set (streamed: "
                        f"{', '.join(catalog.known_names())}); the on-device sets' own shift and "
                        f"OOD sets come from data/shift.py")
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise UserError(f"{key} names {', '.join(repeated)} more than once")


# ------------------------------------------------------------------------------------- config
_OWN_KEYS = {f.name for f in dataclasses.fields(EvaluateConfig)}
_BORROWED_KEYS = ("data_name", "data_root", "download", "teacher_dir")
# keys that mark a YAML as an evaluate config (distillation configs have teacher_dir too)
_EVALUATE_ONLY_KEYS = _OWN_KEYS - {f.name for f in dataclasses.fields(CommonConfig)} - set(_BORROWED_KEYS)


def _pop_flag(argv: list, flag: str):
    """Remove `flag VALUE` from argv (the last one wins); None when absent."""
    value = None
    while flag in argv:
        i = argv.index(flag)
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UserError(f"option {flag} needs a value")
        value = argv[i + 1]
        del argv[i:i + 2]
    return value


def parse_students(value, source: str = "students") -> list:
    """[{name, path, options}] from the YAML list, a {name: path} mapping, or 'name=path,...'."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise UserError(f"{source}: not valid YAML: {str(error).splitlines()[0]}") from None
        else:
            value = []
            for entry in filter(None, (e.strip() for e in text.split(","))):
                name, sep, path = entry.partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise UserError(f"{source}: expected name=path[,name=path...], got {entry!r}")
                value.append({"name": name.strip(), "path": path.strip()})
    if isinstance(value, dict):  # {name: path} or {name: {path, options}}
        value = [{"name": k, **(v if isinstance(v, dict) else {"path": v})} for k, v in value.items()]
    if not isinstance(value, list):
        raise UserError(f"{source}: expected a list of {{name, path, options}}, got {value!r}")
    students, names = [], set()
    for entry in value:
        if not isinstance(entry, dict) or "name" not in entry or ("path" in entry) == ("ensemble" in entry):
            raise UserError(f"{source}: each student needs a name and either a path or an "
                            f"ensemble (a list of paths), got {entry!r}")
        unknown = set(entry) - {"name", "path", "ensemble", "options", "sweeps"}
        if unknown:
            raise UserError(f"{source}: unknown student key(s) {', '.join(sorted(unknown))} "
                            f"(a student has name, path or ensemble, options, sweeps)")
        name = str(entry["name"])
        options, sweeps = entry.get("options") or {}, entry.get("sweeps", {})
        if not isinstance(options, dict):
            raise UserError(f"{source}: options of {name} must be a mapping, got {options!r}")
        if sweeps is not False and not isinstance(sweeps, dict):
            raise UserError(f"{source}: sweeps of {name} must be a mapping or false, got {sweeps!r}")
        paths = entry["ensemble"] if "ensemble" in entry else [entry["path"]]
        if not isinstance(paths, list) or not paths:
            raise UserError(f"{source}: ensemble of {name} must be a non-empty list of paths")
        if name in names or name.lower().startswith("teacher"):
            raise UserError(f"{source}: student name {name!r} is repeated or starts with 'Teacher'")
        names.add(name)
        students.append({"name": name, "paths": [str(p) for p in paths], "options": dict(options),
                         "sweeps": sweeps})
    return students


def parse_evaluate_config(argv) -> EvaluateConfig:
    """parse_config with two additions: `students` (a list of mappings, which the generic
    parser cannot type) and `--config` files of other scripts (only their data keys are used)."""
    argv = list(argv)
    if "--resume" in argv:
        raise UserError("evaluate.py does not resume: give a new or empty --save directory")
    cli_students = _pop_flag(argv, "--students")
    for flag in ("--shift_data", "--ood_data"):  # also a comma-separated list on the command line
        value = _pop_flag(argv, flag)
        if value is not None:
            text = value.strip()
            if text in ("", "null", "[]"):
                text = "[]"
            elif not text.startswith("["):
                text = json.dumps([n.strip() for n in text.split(",") if n.strip()])
            argv += [flag, text]
    config_path = _pop_flag(argv, "--config")
    prefix, students = [], []
    if config_path is not None:
        values = _read_yaml(config_path)
        yaml_students = values.pop("students", None)
        if "resume" in values:
            raise UserError(f"{config_path}: evaluate.py does not resume; remove the resume key")
        if yaml_students is not None or set(values) & _EVALUATE_ONLY_KEYS:
            for key in values:  # an evaluate config: every key must be known
                if key not in _OWN_KEYS:
                    close = difflib.get_close_matches(key, sorted(_OWN_KEYS), n=3, cutoff=0.5)
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise UserError(f"unknown config key {key} in {config_path}{hint}")
        else:
            ignored = sorted(set(values) - set(_BORROWED_KEYS))
            values = {k: v for k, v in values.items() if k in _BORROWED_KEYS}
            if ignored:
                print(f"{config_path} is not an evaluate config: using its "
                      f"{', '.join(values) or 'no'} key(s), ignoring {len(ignored)} others")
        students = parse_students(yaml_students, f"students in {config_path}")
        for key, value in values.items():  # as flags before the user's own, which win
            prefix += [f"--{key}", json.dumps(value)]
    if cli_students is not None:
        students = parse_students(cli_students, "--students")
    config = parse_config(EvaluateConfig, prefix + argv)
    config.students = students
    return config


register_config("evaluate/*", lambda argv: parse_evaluate_config(argv))


# ------------------------------------------------------------------------------------- predict
def _check_student(spec: dict):
    """One clear line for an export no method predicts, or options its method does not take;
    an ensemble's exports must all be of one method. Returns that method."""
    methods = {check_options(path, spec["options"], f"student {spec['name']} ({path})")
               for path in spec["paths"]}
    if len(methods) > 1:
        raise UserError(f"student {spec['name']}: an ensemble pools exports of one method, got "
                        f"{', '.join(sorted(m.name for m in methods))}")
    return methods.pop()


def _load_student(spec: dict, **overrides):
    """The student's Predictor: its one export, or its exports' members pooled."""
    options = {**spec["options"], **overrides}
    if len(spec["paths"]) == 1:
        return load_predictor(spec["paths"][0], **options)
    return ensemble_predictor(spec["name"], [load_predictor(p, **options) for p in spec["paths"]])


def _refuse_cap(n: Optional[int], what: str):
    if n is not None:
        raise UserError(f"num_test_examples applies to the on-device sets only, and {what} streams: "
                        f"remove num_test_examples (a streamed set takes a list file of the images "
                        f"to use, data/sources.py ListFileSource)")


def _cap(split, n: Optional[int], what: str = "the test split"):
    """The first n examples of an on-device Split (all when n is None); a Stream is not capped."""
    if isinstance(split, Stream):
        _refuse_cap(n, what)
        return split
    return split if n is None or len(split) <= n else Split(split.images[:n], split.labels[:n])


def _cap_images(images, n: Optional[int], what: str):
    """An OOD set (uint8 images or a Stream) capped like _cap."""
    if isinstance(images, Stream):
        _refuse_cap(n, what)
        return images
    return images[:n] if n else images


def _inputs(split):
    """What utils.predict.Runner takes: a Split's uint8 images, or the Stream itself."""
    return split if isinstance(split, Stream) else split.images


def _with_batch(stream, batch_size: int):
    """A Stream read in batches of the Runner's size (eval_bs rounded down to a multiple of the
    devices, as the on-device path batches), so both paths draw the same per-batch keys; an
    on-device Split as it is."""
    if not isinstance(stream, Stream) or stream.batch_size == batch_size:
        return stream
    return dataclasses.replace(stream, batch_size=batch_size)


def streamed_test_set(data_name: str, config, image_shape, crop_fraction: float, batch_size: int):
    """The test split of catalog set `data_name` (its val split when it has no test split) as an
    evaluation Stream at `image_shape` (H, W, C): converted to C channels, resized (shorter side
    to H / crop_fraction) and centre-cropped to H x H by data.image_ops.EvalTransform."""
    from data.image_ops import EvalTransform

    channels = int(image_shape[-1])
    source = None
    for split in ("test", "val"):
        source = catalog.open_split(data_name, config.data_root, split, channels=channels, optional=True)
        if source is not None:
            break
    if source is None:  # neither: open_split's own line, naming where it looked
        catalog.open_split(data_name, config.data_root, "test", channels=channels)
    size = int(image_shape[0])
    return Stream(source, batch_size, EvalTransform(size, crop_fraction=crop_fraction),
                  (size, size, channels), train=False, seed=config.seed,
                  num_workers=config.data_workers, process_index=jax.process_index(),
                  process_count=jax.process_count())


def extra_sets(config, dataset, batch_size: int):
    """({name: Stream} shift sets, {name: Stream} OOD sets) of config.shift_data / ood_data;
    a shift set must be labelled in the data set's classes."""
    crop = config.eval_crop_fraction if isinstance(dataset.test, Stream) else 1.0
    shift, ood = {}, {}
    for name in config.shift_data:
        classes = catalog.get_streamed_spec(name, config.data_root).num_classes
        if classes != dataset.num_classes:
            raise UserError(f"shift_data {name} has {classes or 'no'} classes, {config.data_name} "
                            f"{dataset.num_classes}: a shift set is labelled in the data set's classes "
                            f"(list it under ood_data otherwise)")
        stream = streamed_test_set(name, config, dataset.image_shape, crop, batch_size)
        labels = stream.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise UserError(f"shift_data {name}: its labels must be 0..{dataset.num_classes - 1}, "
                            f"found {labels.min()}..{labels.max()} (-1: unlabeled)")
        shift[name] = stream
    for name in config.ood_data:
        ood[name] = streamed_test_set(name, config, dataset.image_shape, crop, batch_size)
    return shift, ood


# ------------------------------------------------------------------------------------- sweeps
SWEEP_KEYS = ("acc", "nll", "ece", "brier", "kl_to_teacher", "agreement", "mi", "var", "amb",
              "disagreement")


def run_sweeps(spec: dict, method, test, teacher_logits, config: EvaluateConfig, mesh, key,
               log=print) -> dict:
    """{sweep name: {"x_label", "points": [{x, options, metrics...}]}} of a student: the sweeps
    its method's hook defines (utils.method.Sweep), each point a fresh load_predictor with the
    point's options, evaluated on the test inputs (an on-device Split, or a Stream read again
    for every point)."""
    if method.sweeps is None or spec["sweeps"] is False:
        return {}
    inputs, labels = _inputs(test), np.asarray(test.labels)
    out = {}
    for sweep in method.sweeps(spec["options"], spec["sweeps"]):
        points = []
        for x, options in sweep.points:
            runner = Runner(_load_student(spec, **options), mesh, config.eval_bs)
            summary = ensemble_summary(runner(inputs, key), labels, teacher_logits,
                                       eps=config.metric_eps)
            points.append({"x": x, "options": options, **{k: summary[k] for k in SWEEP_KEYS},
                           "num_members": runner.predictor.num_members,
                           "eval_seconds": runner.seconds})
            log(f"  {spec['name']} {sweep.name} {sweep.x_label}={x}: acc {summary['acc']:.4f} "
                f"nll {summary['nll']:.4f}")
        out[sweep.name] = {"x_label": sweep.x_label, "points": points}
    return out


# ------------------------------------------------------------------------------------- tables
# test metrics that only some evaluations have: top-5 (more than 5 classes), the shot groups
OPTIONAL_TEST_COLUMNS = (("Top-5 (%)", "top5"), ("Many-shot acc (%)", "many_acc"),
                         ("Medium-shot acc (%)", "medium_acc"), ("Few-shot acc (%)", "few_acc"))


def main_columns(latency_bs: int, results: Optional[dict] = None):
    """(header, getter(result) -> value, format) of the main table, in order; the optional test
    columns (OPTIONAL_TEST_COLUMNS) where some result of `results` has them."""
    test = lambda key: (lambda r: r["test"].get(key))  # noqa: E731
    optional = [(header, test(key), "pct") for header, key in OPTIONAL_TEST_COLUMNS
                if results and any(key in r["test"] for r in results.values())]
    return [
        ("Acc (%)", test("acc"), "pct"),
        *optional,
        ("NLL", test("nll"), "f4"),
        ("ECE (%)", test("ece"), "pct"),
        ("Brier", test("brier"), "f4"),
        ("KL to teacher", test("kl_to_teacher"), "f4"),
        ("Agreement (%)", test("agreement"), "pct"),
        ("AMB", test("amb"), "f4"),
        ("Brier var", test("var"), "f4"),
        ("MI", test("mi"), "f4"),
        ("Disagreement", test("disagreement"), "f4"),
        ("W2", test("w2"), "f4"),
        ("OOD AUROC entropy (%)", lambda r: r["ood_mean"].get("auroc_entropy"), "pct"),
        ("OOD AUROC MI (%)", lambda r: r["ood_mean"].get("auroc_mi"), "pct"),
        ("Shift acc (%)", lambda r: r["shift_mean"].get("acc"), "pct"),
        ("Shift NLL", lambda r: r["shift_mean"].get("nll"), "f4"),
        ("Params", lambda r: r["cost"].get("num_params"), "si"),
        ("FLOPs/input", lambda r: r["cost"].get("flops_per_input"), "si"),
        (f"Latency/batch of {latency_bs} (ms)", lambda r: r["cost"].get("latency_s"), "ms"),
        ("Members", lambda r: r["num_members"], "int"),
    ]


def main_table(results: dict, latency_bs: int) -> str:
    columns = main_columns(latency_bs, results)
    rows = [[name] + [fmt(get(r), kind) for _, get, kind in columns] for name, r in results.items()]
    return markdown_table(["Method"] + [h for h, _, _ in columns], rows)


SHIFT_COLUMNS = [("Acc (%)", "acc", "pct"), ("NLL", "nll", "f4"), ("ECE (%)", "ece", "pct"),
                 ("Brier", "brier", "f4"), ("KL to teacher", "kl_to_teacher", "f4"),
                 ("Agreement (%)", "agreement", "pct"), ("MI", "mi", "f4"),
                 ("Brier var", "var", "f4")]


def shift_tables(results: dict, shift_names) -> list[str]:
    parts = []
    severity = {}
    for name in shift_names:
        base, _, level = name.rpartition("_s")
        if base and level.isdigit():
            severity.setdefault(int(level), []).append(name)
    if severity:
        levels = sorted(severity)
        rows = [[method] + [fmt(np.mean([r["shift"][s]["acc"] for s in severity[k]]), "pct")
                            for k in levels] for method, r in results.items()]
        parts.append("### Mean accuracy (%) by corruption severity\n\n" + markdown_table(
            ["Method"] + [f"severity {k} ({len(severity[k])} sets)" for k in levels], rows))
    for name in shift_names:
        rows = [[method] + [fmt(r["shift"][name].get(key), kind) for _, key, kind in SHIFT_COLUMNS]
                for method, r in results.items()]
        parts.append(f"### {name}\n\n" + markdown_table(["Method"] + [h for h, _, _ in SHIFT_COLUMNS],
                                                         rows))
    return parts


def ood_table(results: dict, ood_names) -> str:
    headers = ["Method"]
    for name in ood_names:
        headers += [f"{name} AUROC entropy (%)", f"{name} AUROC MI (%)"]
    rows = []
    for method, r in results.items():
        row = [method]
        for name in ood_names:
            row += [fmt(r["ood"][name]["auroc_entropy"], "pct"), fmt(r["ood"][name]["auroc_mi"], "pct")]
        rows.append(row)
    return markdown_table(headers, rows)


def sweep_tables(sweeps: dict) -> list[str]:
    """sweeps: {student: {sweep name: {x_label, points}}} -> one markdown table per sweep."""
    parts = []
    for student, by_name in sweeps.items():
        for sweep_name, sweep in by_name.items():
            rows = [[p["x"], ", ".join(f"{k}={v}" for k, v in p["options"].items()), p["num_members"],
                     fmt(p["acc"], "pct"), fmt(p["nll"]), fmt(p["kl_to_teacher"]),
                     fmt(p["agreement"], "pct"), fmt(p["mi"])] for p in sweep["points"]]
            parts.append(f"### {student}: {sweep_name}\n\n" + markdown_table(
                [sweep["x_label"], "Options", "Members", "Acc (%)", "NLL", "KL to teacher",
                 "Agreement (%)", "MI"], rows))
    return parts


def teacher_description(config) -> str:
    if config.teacher_mode == "swa_means":
        return "the SWA mean of each run"
    return f"{config.teacher_samples_per_run} SWAG samples per run"


def _optional_columns_note(config, results: dict) -> str:
    tests = [r["test"] for r in results.values()]
    note = ""
    if any("top5" in t for t in tests):
        note += " Top-5 = the label among the ensemble's 5 most probable classes."
    if any("many_acc" in t for t in tests):
        many, few = config.shot_thresholds
        note += (f" Many-shot: classes with more than {many} training images, few-shot: fewer than "
                 f"{few}, medium-shot: the rest; each the mean of its classes' accuracies.")
    return note


def write_markdown(path: str, config, results: dict, shift_names, ood_names, sweeps: dict,
                   plot_names, info: dict, latency_bs: int):
    lines = [
        f"# Evaluation on {config.data_name}",
        "",
        f"{info['num_test']} test inputs{' (capped)' if config.num_test_examples else ''}; "
        f"teacher {config.teacher_dir} ({teacher_description(config)}); "
        f"{info['date']} on {info['device']}. Every number is in results.json.",
        "",
        "Ensemble = mean of the members' softmax. KL = KL(teacher ‖ student) of the ensembles; "
        "W2 between the per-input sets of centred member logits; OOD AUROC averaged over "
        f"{', '.join(ood_names) or 'no OOD set'}; shift = mean over {len(shift_names)} shift sets. "
        f"FLOPs per input from XLA's cost analysis of the compiled prediction; latency = median "
        f"of {config.latency_repeats} timed batches of {latency_bs} after warm-up, one device."
        + _optional_columns_note(config, results),
        "",
        main_table(results, latency_bs),
        "",
    ]
    if shift_names:
        lines += ["## Shift sets", ""] + [p + "\n" for p in shift_tables(results, shift_names)]
    if ood_names:
        lines += ["## Out-of-distribution sets", "", ood_table(results, ood_names), ""]
    if sweeps:
        lines += ["## Sweeps", ""] + [p + "\n" for p in sweep_tables(sweeps)]
    lines += ["## Plots", ""] + [f"![{n}]({n})" for n in plot_names] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ------------------------------------------------------------------------------------- plots
def write_plots(run_dir: str, results: dict, reliability: dict, sweeps: dict, teacher_name: str):
    names = []
    plots.reliability_diagrams(os.path.join(run_dir, "reliability.png"), reliability,
                               title="reliability on the test set")
    names.append("reliability.png")
    spread = lambda value: 0.0 if value is None else value  # noqa: E731 (one member: none)
    points = {name: {"acc": r["test"]["acc"], "mi": spread(r["test"]["mi"]),
                     "var": spread(r["test"]["var"]),
                     "shift": [{"acc": s["acc"], "mi": spread(s["mi"]), "var": spread(s["var"])}
                               for s in r["shift"].values()]} for name, r in results.items()}
    plots.diversity_vs_accuracy(os.path.join(run_dir, "diversity_vs_accuracy.png"), points)
    names.append("diversity_vs_accuracy.png")
    keys = ("acc", "nll", "kl_to_teacher")
    t = results[teacher_name]["test"]
    reference = {"label": teacher_name, "acc": t["acc"], "nll": t["nll"]}
    for student, by_name in sweeps.items():
        for sweep_name, sweep in by_name.items():
            points = sweep["points"]
            name = plots.sweep_file_name(student, sweep_name)
            curve = {"x": [p["x"] for p in points], **{k: [p[k] for p in points] for k in keys}}
            xs = curve["x"]
            plots.sweep_plot(os.path.join(run_dir, name), {student: curve}, sweep["x_label"], keys,
                             reference=reference,
                             logx=plots.wide_range(xs),
                             title=f"{student}: quality against {sweep['x_label']}")
            names.append(name)
    return names


# ------------------------------------------------------------------------------------- main
def _latency_batch(images, size: int) -> np.ndarray:
    """The first `size` images (of a Stream: of its first batch), repeated when fewer."""
    if isinstance(images, Stream):
        batches = images.batches(0)
        try:
            first = next(batches)
        finally:
            batches.close()
        images = first["images"][first["mask"]]
    idx = np.arange(size) % len(images)
    return np.ascontiguousarray(images[idx])


def _mean(values):
    """The mean of the values that are defined (None: a metric a one-member model lacks)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _plain(tree):
    if isinstance(tree, dict):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    if isinstance(tree, (np.generic, np.ndarray)):
        return tree.item() if np.ndim(tree) == 0 else tree.tolist()
    return tree


def _registry_shift_sets(config, dataset, test, log) -> ShiftSets:
    """data/shift.py's sets of a registry data set (none for a catalog one); when the registry set
    streams, they are used only if its evaluation transform leaves its images as they are (the
    registry's shape, eval_crop_fraction 1), as data/shift.py's arrays are."""
    if catalog.is_streamed(config.data_name):
        return ShiftSets({}, {})
    if isinstance(test, Stream):
        native = tuple(datasets.get_spec(config.data_name).image_shape)
        if tuple(dataset.image_shape) != native or config.eval_crop_fraction != 1:
            log(f"data/shift.py's sets of {config.data_name} are its {native} images as they are; "
                f"the streamed test images are resized to {tuple(dataset.image_shape)} with "
                f"eval_crop_fraction {config.eval_crop_fraction}: those sets are not evaluated")
            return ShiftSets({}, {})
        return load_shift_sets(config.data_name, config.data_root, None)
    return load_shift_sets(config.data_name, config.data_root, test)


def evaluate(config: EvaluateConfig, log=print) -> dict:
    """The whole evaluation; returns {run_dir, results, sweeps, ...} (also written to disk)."""
    refuse_existing(config.save)
    find_teacher_runs(config.teacher_dir)  # the cheap checks first: paths, scripts, options
    methods = {spec["name"]: _check_student(spec) for spec in config.students}
    wall = time.perf_counter()
    timings = {}
    mesh = make_mesh()
    batch_size = max(mesh.size, config.eval_bs - config.eval_bs % mesh.size)  # the Runner's
    dataset = load_data(config)
    if dataset.test is None:
        raise UserError(f"{config.data_name} has no test or val split to evaluate on")
    test = _with_batch(_cap(dataset.test, config.num_test_examples), batch_size)
    labels = np.asarray(test.labels)
    if dataset.num_classes is None or (len(labels) and labels.min() < 0):
        raise UserError(f"the test split of {config.eval_data_name or config.data_name} is "
                        f"unlabeled: evaluate.py needs labels (eval_data_name names a labelled set)")
    groups = shot_groups(config, dataset)
    sets = _registry_shift_sets(config, dataset, test, log) if config.eval_shift else ShiftSets({}, {})
    shift = {name: _cap(split, config.num_test_examples) for name, split in sets.shift.items()}
    ood = {name: _cap_images(images, config.num_test_examples, name) for name, images in sets.ood.items()}
    if config.eval_shift:
        extra_shift, extra_ood = extra_sets(config, dataset, batch_size)
        shift.update({n: _cap(s, config.num_test_examples, f"shift_data {n}") for n, s in extra_shift.items()})
        ood.update({n: _cap_images(s, config.num_test_examples, f"ood_data {n}") for n, s in extra_ood.items()})
    elif config.shift_data or config.ood_data:
        log("eval_shift is false: shift_data and ood_data are not evaluated")
    timings["data_s"] = time.perf_counter() - wall
    log(f"{config.data_name}: {len(test)} test inputs{' (streamed)' if isinstance(test, Stream) else ''}, "
        f"{len(shift)} shift sets, {len(ood)} OOD sets ({', '.join(ood) or 'none'})")

    start = time.perf_counter()
    teacher = configured_teacher(config)
    if teacher.sidecar.get("data_name") not in (None, config.data_name):
        raise UserError(f"the teachers in {config.teacher_dir} were trained on "
                        f"{teacher.sidecar['data_name']}, not {config.data_name}")
    predictors = {teacher.name: teacher}
    specs = {}
    for spec in config.students:
        predictor = _load_student(spec)
        data_name = predictor.sidecar.get("data_name")
        if data_name not in (None, config.data_name):
            raise UserError(f"student {spec['name']} ({', '.join(spec['paths'])}) was trained on "
                            f"{data_name}, not {config.data_name}")
        predictors[spec["name"]] = predictor
        specs[spec["name"]] = spec
    run_dir = prepare_run_dir(config, "evaluate")
    timings["load_s"] = time.perf_counter() - start
    log(f"evaluating {', '.join(f'{n} ({p.kind}, {p.num_members} members)' for n, p in predictors.items())}"
        f" into {run_dir}")

    runners = {name: Runner(p, mesh, config.eval_bs) for name, p in predictors.items()}
    base_key = jax.random.PRNGKey(config.seed)
    results = {name: {"kind": p.kind, "num_members": p.num_members,
                      "paths": specs[name]["paths"] if name in specs else [config.teacher_dir],
                      "options": specs[name]["options"] if name in specs else {},
                      "test": {}, "shift": {}, "ood": {}, "shift_mean": {}, "ood_mean": {},
                      "cost": {}} for name, p in predictors.items()}
    in_scores, reliability = {}, {}
    teacher_probs = None
    per_example = {"nll": [], "kl_to_teacher": []}

    # The test split, with W2 and everything else.
    start = time.perf_counter()
    key = jax.random.fold_in(base_key, 0)
    test_inputs = _inputs(test)
    teacher_test = runners[teacher.name](test_inputs, key, desc=f"{teacher.name} test")
    check_classes(teacher_test, dataset.num_classes, teacher.name)
    for name, runner in runners.items():
        is_teacher = name == teacher.name
        logits = teacher_test if is_teacher else runner(test_inputs, key, desc=f"{name} test")
        check_classes(logits, dataset.num_classes, name)
        summary = ensemble_summary(logits, labels, None if is_teacher else teacher_test,
                                   w2=config.w2, eps=config.metric_eps)
        probs = metrics.ensemble_probs(logits)
        teacher_probs = probs if is_teacher else teacher_probs  # the teacher comes first
        per_example["nll"].append(metrics.nll_per_input(probs, labels, config.metric_eps))
        per_example["kl_to_teacher"].append(metrics.kl_per_input(teacher_probs, probs))
        if dataset.num_classes > 5:
            summary["top5"] = metrics.top_k_accuracy(probs, labels, 5)
        if groups is not None:
            summary.update(metrics.shot_accuracies(probs, labels, *groups))
        results[name]["test"] = summary
        in_scores[name] = uncertainty_scores(logits)
        reliability[name] = (probs.max(axis=-1), probs.argmax(axis=-1) == labels)
        log(f"{name} test: " + "  ".join(f"{k} {summary[k]:.4f}" for k in
                                         ("acc", "top5", "many_acc", "medium_acc", "few_acc", "nll",
                                          "ece", "kl_to_teacher", "w2", "mi")
                                         if summary.get(k) is not None))
    timings["test_s"] = time.perf_counter() - start

    # Shift sets: the same metrics but W2, KL and agreement to the teacher on the same inputs.
    start = time.perf_counter()
    for index, (set_name, split) in enumerate(shift.items(), start=1):
        key = jax.random.fold_in(base_key, index)
        inputs, shift_labels = _inputs(split), np.asarray(split.labels)
        t_logits = runners[teacher.name](inputs, key)
        for name, runner in runners.items():
            is_teacher = name == teacher.name
            logits = t_logits if is_teacher else runner(inputs, key)
            results[name]["shift"][set_name] = ensemble_summary(
                logits, shift_labels, None if is_teacher else t_logits, eps=config.metric_eps)
        log(f"shift {set_name}: " + "  ".join(f"{n} {r['shift'][set_name]['acc']:.4f}"
                                               for n, r in results.items()))
    for r in results.values():
        if r["shift"]:
            r["shift_mean"] = {k: _mean([s[k] for s in r["shift"].values()])
                               for k in ("acc", "nll", "ece", "brier", "mi")}
    timings["shift_s"] = time.perf_counter() - start

    # OOD sets: AUROC of telling them from the test inputs by entropy and by MI.
    start = time.perf_counter()
    for index, (set_name, images) in enumerate(ood.items(), start=len(shift) + 1):
        key = jax.random.fold_in(base_key, index)
        for name, runner in runners.items():
            results[name]["ood"][set_name] = ood_aurocs(in_scores[name],
                                                        uncertainty_scores(runner(images, key)))
        log(f"OOD {set_name}: " + "  ".join(f"{n} {r['ood'][set_name]['auroc_entropy']:.4f}"
                                             for n, r in results.items()))
    for r in results.values():
        if r["ood"]:
            r["ood_mean"] = {k: _mean([o[k] for o in r["ood"].values()])
                             for k in ("auroc_entropy", "auroc_mi")}
    timings["ood_s"] = time.perf_counter() - start
    for name, runner in runners.items():
        results[name]["predict_seconds"] = runner.seconds

    # Cost: parameters, FLOPs per input, latency of one batch.
    start = time.perf_counter()
    latency_bs = config.latency_bs or config.eval_bs
    batch = _latency_batch(test_inputs, latency_bs)
    for name, predictor in predictors.items():
        results[name]["cost"] = predictor_cost(predictor, batch, key=base_key,
                                               repeats=config.latency_repeats,
                                               warmup=config.latency_warmup)
        c = results[name]["cost"]
        log(f"{name} cost: {c['num_params']} params, {c['flops_per_input']:.4g} FLOPs/input, "
            f"{1e3 * c['latency_s']:.2f} ms per batch of {latency_bs}")
    timings["cost_s"] = time.perf_counter() - start

    # Each student's sweeps, from its method's hook (EDFM: members, function evaluations).
    start = time.perf_counter()
    sweeps = {}
    for name, spec in specs.items() if config.sweeps else ():
        student_sweeps = run_sweeps(spec, methods[name], test, teacher_test, config, mesh,
                                    jax.random.fold_in(base_key, 10_000), log=log)
        if student_sweeps:
            sweeps[name] = student_sweeps
    timings["sweeps_s"] = time.perf_counter() - start

    start = time.perf_counter()
    plot_names = write_plots(run_dir, results, reliability, sweeps, teacher.name)
    timings["plots_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - wall
    info = {"num_test": len(test), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, "
                      f"{len(jax.devices())} devices)"}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(_plain({"config": dataclasses.asdict(config), "info": info, "timings": timings,
                          "shift_sets": list(shift), "ood_sets": list(ood), "methods": results,
                          "sweeps": sweeps, "plots": plot_names}), f, indent=1)
    np.savez_compressed(os.path.join(run_dir, "per_example.npz"), names=np.array(list(runners)),
                        labels=labels, **{k: np.stack(v).astype(np.float32) for k, v in per_example.items()})
    write_markdown(os.path.join(run_dir, "results.md"), config, results, list(shift), list(ood),
                   sweeps, plot_names, info, latency_bs)
    table = main_table(results, latency_bs)
    log("\n" + table)
    log(f"results in {run_dir}/results.md ({timings['total_s']:.0f} s)")
    return {"run_dir": run_dir, "results": results, "sweeps": sweeps, "table": table,
            "plots": plot_names, "timings": timings}


@cli_main
def main(argv):
    return evaluate(parse_evaluate_config(argv))


if __name__ == "__main__":
    main()
