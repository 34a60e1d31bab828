"""The bad-input table: each case runs a real entry script's command line (its `main(argv)`, in
this process) on the tiny generated data of tests/conftest.py's tiny_setup, and must exit non-zero
with one line naming the problem, leaving every file that existed before exactly as it was and
creating no run directory."""
import importlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD_CONFIG = os.path.join(ROOT, "config/distillation/kd_fmnist_frnrelu.yaml")


def _files(root):
    """{relative path: bytes} of every file under root (lock files excepted)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name != ".lock":
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def _damage(export_dir):
    """Overwrite bytes in the middle of an export's largest array file."""
    files = [os.path.join(folder, name) for folder, _, names in os.walk(export_dir) for name in names]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(1).bytes(32))


def _edit_sidecar(export_dir, **changes):
    path = os.path.join(export_dir, "sidecar.json")
    with open(path) as f:
        sidecar = json.load(f)
    for key, value in changes.items():
        target = sidecar
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    with open(path, "w") as f:
        json.dump(sidecar, f)


@pytest.fixture(scope="module")
def world(tiny_setup):
    """Inputs, each broken one way, next to good ones, and one finished KD run (1 epoch)."""
    import kd_and_endd

    from conftest import write_fmnist_dir

    root = tiny_setup["root"] / "bad_input"
    root.mkdir()
    teachers = tiny_setup["teachers"]
    for name, change in [("teachers_corrupt", _damage),
                         ("teachers_other_sidecar", lambda d: _edit_sidecar(d, model__width=2)),
                         ("teachers_other_data", lambda d: _edit_sidecar(d, data_name="CIFAR10_x32"))]:
        shutil.copytree(teachers, root / name)
        for run in ("seed1", "seed2"):
            change(str(root / name / run / "model"))
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (24, 28, 28)), "train_labels": np.arange(24) % 10,
              "test_images": rng.integers(0, 256, (8, 28, 28)), "test_labels": np.arange(8) % 10}
    write_fmnist_dir(root / "data_labels" / datasets.FASHION_MNIST_DIRNAME,
                     {**arrays, "train_labels": np.arange(24) % 10 + 3}, gz=False)
    write_fmnist_dir(root / "data_truncated" / datasets.FASHION_MNIST_DIRNAME, arrays, gz=False)
    truncated = root / "data_truncated" / datasets.FASHION_MNIST_DIRNAME / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (root / "a_file").write_text("not a directory\n")
    (root / "a_folder").mkdir()
    (root / "a_folder" / "keep.txt").write_text("keep\n")
    done = root / "done"  # the flags builders name it under("done")
    kd_and_endd.main(_kd_args(tiny_setup, "--save", str(done), "--optim_ne", "1"))
    shutil.copytree(done, root / "corrupt_run")
    _damage(str(root / "corrupt_run" / "checkpoints"))
    _damage(str(root / "corrupt_run" / "model"))
    return {"root": root}


def _kd_args(setup, *extra):
    return ["--config", KD_CONFIG, *_fresh_args(KD, setup), *extra]


def _fresh_args(script, setup):
    """A fresh run's keys on the tiny set-up (the case's own flags come after, and win)."""
    args = ["--data_root", setup["data_root"], "--optim_bs", "8", "--model_depth", "8",
            "--model_width", "1", "--log_every", "1"]
    if script != "sgd_swag":
        args += ["--teacher_dir", setup["teachers"]]
    if script == KD:
        args += ["--num_teachers", "2"]
    return args


KD = "kd_and_endd"


def under(*parts):
    """argv builder: a path under the world's folder."""
    return lambda world: str(world["root"].joinpath(*parts))


def flags(*items):
    """argv builder: flags whose values may be builders of paths."""
    return lambda world: [item(world) if callable(item) else item for item in items]


# (case id, script, argv builder, a regex the one line must match)
CASES = [
    ("unknown key", KD, flags("--optim_lrr", "0.1"), r"unknown option --optim_lrr \(did you mean optim_lr"),
    ("wrong type", KD, flags("--optim_bs", "many"), r"optim_bs expects int, got 'many'"),
    ("negative learning rate", "sgd_swag", flags("--optim_lr", "-0.1"), r"optim_lr must be > 0"),
    ("negative explosion factor", "fed", flags("--divergence_factor", "-1"), r"divergence_factor must be >= 0"),
    ("config is a folder", KD, flags("--config", under("a_folder")),
     r"cannot read the config file .*a_folder: Is a directory"),
    ("missing config", KD, flags("--config", under("nope.yaml")), r"nope.yaml does not exist"),
    ("missing data", KD, flags("--data_root", under("no_data")),
     r"data set FashionMNIST_x28 not found: looked for .* in .*no_data/FashionMNIST"),
    ("truncated data file", KD, flags("--data_root", under("data_truncated")),
     r"corrupt IDX file .*train-images-idx3-ubyte: header says .* but the payload has 4984 bytes"),
    ("labels out of range", KD, flags("--data_root", under("data_labels")),
     r"training labels span 3..12, expected 0..9"),
    ("wrong number of classes", KD, flags("--num_classes", "100"), r"num_classes is 100 but"),
    ("unknown data set", KD, flags("--data_name", "MNIST_x99"), r"unknown data_name 'MNIST_x99'"),
    ("teachers of another data set", KD, flags("--teacher_dir", under("teachers_other_data")),
     r"was trained on CIFAR10_x32, not FashionMNIST_x28"),
    ("corrupt teacher arrays", KD, flags("--teacher_dir", under("teachers_corrupt")),
     r"seed\d/model is corrupt: array .* does not match the hash"),
    ("sidecar not its arrays'", KD, flags("--teacher_dir", under("teachers_other_sidecar")),
     r"seed1/model: its sidecar.json describes a network whose .* but its arrays hold"),
    ("missing teachers", KD, flags("--teacher_dir", under("no_teachers")), r"no_teachers does not exist"),
    ("corrupt KD backbone", "edfm", flags("--pretrained_resnet", under("corrupt_run")),
     r"corrupt_run/model is corrupt: array .* does not match the hash"),
    ("select metric", KD, flags("--select_metric", "ens_nll"),
     r"select_metric 'ens_nll' is not a validation metric"),
    ("existing --save", KD, flags("--save", under("done")), r"already holds a run; pass --resume"),
    ("--save is a file", KD, flags("--save", under("a_file")), r"a_file is a file, not a directory"),
    ("--save under a file", KD, flags("--save", under("a_file", "run")),
     r"cannot create the run directory .*a_file/run: Not a directory"),
    ("--resume not a run", KD, flags("--resume", under("a_folder")), r"no config.yaml there"),
    ("--resume and --save disagree", KD, flags("--resume", under("done"), "--save", under("x")),
     r"disagree: give one"),
    ("--resume another architecture", KD, flags("--resume", under("done"), "--model_width", "2"),
     r"checkpoints/2 does not match this run: array .* is float32\[.*\] there"),
    ("--resume a corrupt checkpoint", KD, flags("--resume", under("corrupt_run"), "--optim_ne", "2"),
     r"corrupt_run/checkpoints/2 is corrupt"),
    ("a 224-only network on 28x28 images", KD, flags("--model_arch", "mobilenetv1"),
     r"model_arch mobilenetv1 takes 224x224 images, the data are 28x28: set image_size 224"),
    ("a streamed set on the device", KD, flags("--data_name", "imagenet2012", "--input_pipeline", "device"),
     r"imagenet2012 streams \(it does not fit on a device\)"),
    ("a missing streamed set", KD, flags("--data_name", "ImageNet_LT", "--data_root", under("no_data")),
     r"data set ImageNet_LT \(train split\) not found: looked for .*no_data/ImageNet_LT/ImageNet_LT_train.txt"),
    ("train_on_val with a selection", KD, flags("--train_on_val", "true", "--select_metric", "nll"),
     r"train_on_val trains on the validation images too, so nothing is left to select on"),
    ("out of memory", KD, flags("--model_width", "100000"),
     r"out of memory \(.*RESOURCE_EXHAUSTED.*\): lower optim_bs \(now 8\)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,make_argv,message", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, tiny_setup, script, make_argv, message, capsys):
    main = importlib.import_module(script).main
    argv = make_argv(world)
    if "--resume" not in argv:  # a fresh run: the tiny set-up's keys, then the case's
        argv = [*(_kd_args(tiny_setup) if script == KD else _fresh_args(script, tiny_setup)),
                *argv]
        argv = argv if "--save" in argv else [*argv, "--save", str(world["root"] / "new_run")]
    before = _files(world["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert _files(world["root"]) == before
    assert not os.path.exists(world["root"] / "new_run")
