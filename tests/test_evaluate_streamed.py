"""evaluate.py on a streamed data set (`folder:<path>` of generated JPEGs) with streamed shift and
OOD sets (shift_data, ood_data): the numbers equal those of the same decoded, eval-transformed
images predicted on the device; and num_test_examples on a stream is one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import evaluate
from utils import metrics

SIZE = 32
VAL_PER_CLASS = (5, 5, 4, 4)  # 18 test images: batches of 4 (eval_bs 6 on 4 devices), the last padded


def _write(root, split, counts, shape, rng):
    for c, count in enumerate(counts):
        os.makedirs(root / split / f"n{c:08d}", exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"{i}.JPEG", quality=90)


@pytest.fixture(scope="module")
def folder_sets(tmp_path_factory):
    """The evaluated set (train 2 per class, val: the test split), a shift set of larger JPEGs
    with the same 4 classes (val only) and a grayscale 2-class OOD set (val only), plus a
    ResNet-8 teacher and a KD-format student exported for the evaluated set's data_name."""
    from models.resnet import ResNet
    from utils.checkpoints import save_resnet

    root = tmp_path_factory.mktemp("evaluate_streamed")
    rng = np.random.default_rng(0)
    _write(root / "images", "train", (2, 2, 2, 2), (SIZE, SIZE, 3), rng)
    _write(root / "images", "val", VAL_PER_CLASS, (SIZE, SIZE, 3), rng)
    _write(root / "shifted", "val", (3, 2, 2, 3), (40, 48, 3), rng)  # resized, then centre-cropped
    _write(root / "ood", "val", (3, 4), (24, 24), rng)  # grayscale: 1 channel, made 3
    data_name = f"folder:{root / 'images'}"
    model = ResNet(num_classes=4, depth=8, width=1, planes=8, pixel_mean=(0.485, 0.456, 0.406),
                   pixel_std=(0.229, 0.224, 0.225))
    variables = {}
    for name, seed in (("teacher", 1), ("kd", 2)):
        variables[name] = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)))
        save_resnet(str(root / name / "model"), model, variables[name]["params"], {},
                    data_name=data_name, method="KD")
    return root, data_name, model, variables


def _args(root, data_name, save, *extra):
    return ["--data_name", data_name, "--teacher_dir", str(root / "teacher"), "--students",
            f"KD={root / 'kd'}", "--teacher_samples_per_run", "1", "--image_size", str(SIZE),
            "--eval_crop_fraction", "1", "--data_workers", "0", "--eval_bs", "6", "--w2", "false",
            "--sweeps", "false", "--latency_bs", "4", "--latency_repeats", "1", "--latency_warmup", "0",
            "--save", str(save), *extra]


def _decoded(folder, crop_fraction, classes_from=None):
    """The folder's images as the streamed path sees them, decoded and eval-transformed here."""
    from data.image_ops import EvalTransform
    from data.sources import ImageFolderSource, list_classes

    classes = list_classes(classes_from) if classes_from else None
    source = ImageFolderSource(folder, channels=3, classes=classes)
    crop = EvalTransform(SIZE, crop_fraction=crop_fraction)
    return np.stack([crop(source[i]["image"]) for i in range(len(source))]), np.asarray(source.labels)


@pytest.mark.slow
def test_evaluate_streams_a_folder_set_and_streamed_shift_and_ood_sets(folder_sets, tmp_path):
    root, data_name, model, variables = folder_sets
    save = tmp_path / "eval"
    evaluate.main(_args(root, data_name, save, "--shift_data", f"folder:{root / 'shifted'}",
                        "--ood_data", f"folder:{root / 'ood'}"))
    results = json.loads((save / "results.json").read_text())
    methods = results["methods"]
    teacher_name = "Teacher (1x1)"
    assert list(methods) == [teacher_name, "KD"]
    shift_name, ood_name = f"folder:{root / 'shifted'}", f"folder:{root / 'ood'}"
    assert results["shift_sets"] == [shift_name] and results["ood_sets"] == [ood_name]
    assert results["info"]["num_test"] == sum(VAL_PER_CLASS)

    # On the device: the same JPEGs decoded and transformed here, through the networks directly.
    def probs(name, images):
        return np.asarray(jax.nn.softmax(model.apply(variables[name], images / 255.0)), np.float64)

    images, labels = _decoded(root / "images" / "val", 1.0, root / "images" / "train")
    assert images.shape == (18, SIZE, SIZE, 3) and list(np.bincount(labels)) == list(VAL_PER_CLASS)
    teacher, kd = probs("teacher", images), probs("kd", images)
    for name, p in ((teacher_name, teacher), ("KD", kd)):
        test = methods[name]["test"]
        assert test["acc"] == pytest.approx(metrics.accuracy(p, labels), abs=1e-9), name
        assert test["nll"] == pytest.approx(metrics.nll(p, labels), rel=1e-4), name
        assert "top5" not in test and "many_acc" not in test  # 4 classes, no shot_thresholds
    assert methods["KD"]["test"]["kl_to_teacher"] == pytest.approx(metrics.kl_to_teacher(teacher, kd),
                                                                   rel=1e-3, abs=1e-6)
    assert methods["KD"]["test"]["agreement"] == pytest.approx(metrics.agreement(teacher, kd))
    # the two models differ on these inputs, so the comparison above can tell them apart
    assert metrics.nll(teacher, labels) != pytest.approx(metrics.nll(kd, labels), rel=1e-3)

    # The shift set: resized so its shorter side is 32, centre-cropped, in the same classes.
    shift_images, shift_labels = _decoded(root / "shifted" / "val", 1.0)
    assert shift_images.shape == (10, SIZE, SIZE, 3)
    shifted = methods[teacher_name]["shift"][shift_name]
    t_shift = probs("teacher", shift_images)
    assert shifted["acc"] == pytest.approx(metrics.accuracy(t_shift, shift_labels), abs=1e-9)
    assert shifted["nll"] == pytest.approx(metrics.nll(t_shift, shift_labels), rel=1e-4)
    assert methods["KD"]["shift"][shift_name]["kl_to_teacher"] == pytest.approx(
        metrics.kl_to_teacher(t_shift, probs("kd", shift_images)), rel=1e-3, abs=1e-6)
    # The OOD set (grayscale, 2 other classes): AUROC of its entropy against the test inputs'.
    ood_images, _ = _decoded(root / "ood" / "val", 1.0)
    for name, key, p in ((teacher_name, "teacher", teacher), ("KD", "kd", kd)):
        expected = metrics.ood_auroc(metrics.predictive_entropy(p),
                                     metrics.predictive_entropy(probs(key, ood_images)))
        assert methods[name]["ood"][ood_name]["auroc_entropy"] == pytest.approx(expected, abs=1e-6)
        # the latency batch: the stream's first batch (4 real rows), as one compiled call
        assert methods[name]["cost"]["batch_size"] == 4 and methods[name]["cost"]["latency_s"] > 0

    text = (save / "results.md").read_text()
    assert f"### {shift_name}\n" in text and f"{ood_name} AUROC entropy (%)" in text
    assert "Top-5" not in text and "Many-shot" not in text


def test_streamed_sets_refuse_num_test_examples_and_foreign_labels(folder_sets, tmp_path, capsys):
    """One line, exit 2, nothing written: num_test_examples on a streamed test split or a
    streamed shift set; a shift set with other classes; an on-device name as shift_data."""
    root, data_name, _, _ = folder_sets
    cases = [
        (["--num_test_examples", "4"], "num_test_examples applies to the on-device sets only"),
        (["--shift_data", f"folder:{root / 'ood'}"], "has 2 classes"),
        (["--shift_data", "CIFAR10_x32"], "is not a streamed data set"),
    ]
    for extra, message in cases:
        save = tmp_path / "refused"
        with pytest.raises(SystemExit) as info:
            evaluate.main(_args(root, data_name, save, *extra))
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not save.exists()


def test_an_on_device_set_refuses_num_test_examples_with_a_streamed_ood_set(folder_sets, fake_fmnist_root,
                                                                            tmp_path, capsys):
    root, _, _, _ = folder_sets
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--data_root", fake_fmnist_root, "--teacher_dir", str(root / "teacher"),
                       "--num_test_examples", "4", "--ood_data", f"folder:{root / 'ood'}",
                       "--save", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert f"ood_data folder:{root / 'ood'} streams" in err and not (tmp_path / "x").exists()


def test_shift_and_ood_data_on_the_command_line():
    config = evaluate.parse_evaluate_config(["--shift_data", "tfds:cifar10_1,tfds:cifar10_corrupted/fog_5",
                                             "--ood_data", "[tfds:svhn_cropped]"])
    assert config.shift_data == ["tfds:cifar10_1", "tfds:cifar10_corrupted/fog_5"]
    assert config.ood_data == ["tfds:svhn_cropped"]
    assert evaluate.parse_evaluate_config(["--ood_data", "null"]).ood_data == []
    from utils.errors import UserError

    with pytest.raises(UserError, match="more than once"):
        evaluate.parse_evaluate_config(["--ood_data", "tfds:svhn_cropped,tfds:svhn_cropped"])
