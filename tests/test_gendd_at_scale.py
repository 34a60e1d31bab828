"""GenDD's ImageNet recipe end to end on the streaming path, at a tiny resolution: the shipped
config (config/distillation/gendd_in1k_res34_res18.yaml) with an ImageNet-style folder of JPEGs
written here (`folder:<path>`), a random teacher export and the zoo's ResNet-18 student, stage 1
then stage 2 from it, two steps each, and the unsupervised recipe on an unlabeled folder
validated on that labelled folder. The teacher is a ResNet-18 standing in for the recipe's
ResNet-34: the same 512-d feature (8 tokens), about half the compilation."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

CONFIG = "config/distillation/gendd_in1k_res34_res18.yaml"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 4, 8, 3, 32


def write_folder(root, split, per_class, rng):
    for c in range(CLASSES):
        os.makedirs(root / split / f"n{c:08d}", exist_ok=True)
        for i in range(per_class):
            height, width = rng.integers(36, 60, 2)  # JPEGs of several sizes, as ImageNet's
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"{i}.JPEG", quality=90)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    from models.zoo import build_model
    from models.zoo.resnet_imagenet import IMAGENET_MEAN, IMAGENET_STD
    from utils.checkpoints import save_resnet
    from utils.trainer import init_variables

    root = tmp_path_factory.mktemp("gendd_at_scale")
    rng = np.random.default_rng(0)
    write_folder(root / "images", "train", TRAIN_PER_CLASS, rng)
    write_folder(root / "images", "val", VAL_PER_CLASS, rng)
    data_name = f"folder:{root / 'images'}"
    teacher = build_model("resnet18", CLASSES, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
    params, model_state = init_variables(teacher, jax.random.PRNGKey(1), (SIZE, SIZE, 3))
    save_resnet(str(root / "teacher"), teacher, params, model_state, data_name=data_name)
    return root, data_name, teacher, {"params": params, **model_state}


def run_args(root, data_name, run):
    # 32 training images in batches of 16: two steps an epoch; in-process loading (data_workers 0)
    return ["--config", CONFIG, "--data_name", data_name, "--teacher_dir", str(root / "teacher"),
            "--image_size", str(SIZE), "--optim_bs", "16", "--eval_bs", "8", "--optim_ne", "1",
            "--stage1_ne", "1", "--warmup_epochs", "0", "--data_workers", "0", "--log_every", "1",
            "--diffusion_batch_mul", "2", "--head_width", "32", "--num_sampling_steps", "4",
            "--num_diffusion_steps", "20", "--num_sampling", "1", "--checkpoint_every", "0",
            "--save", str(run)]


def read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_the_imagenet_recipe_streams_stage_1_then_stage_2(imagenet_like, tmp_path):
    import gendd
    from data.image_ops import EvalTransform
    from data.sources import ImageFolderSource

    root, data_name, teacher, teacher_vars = imagenet_like
    gendd.main([*run_args(root, data_name, tmp_path / "s1"), "--gendd_stage", "1",
                "--select_metric", "null"])
    gendd.main([*run_args(root, data_name, tmp_path / "s2"), "--gendd_stage", "2",
                "--init_from", str(tmp_path / "s1"), "--test_table", "true"])
    for stage in ("s1", "s2"):
        (record,) = [r for r in read_log(tmp_path / stage) if "epoch" in r]
        assert record["step"] == 2 and np.isfinite(record["train/loss"])
    assert "train/diff_loss" in record and "val/acc" in record

    # The test table's teacher row is the streamed val folder, resized and centre-cropped, in
    # order, its last batch padded (12 images in batches of 8): recomputed here directly.
    val = ImageFolderSource(root / "images" / "val")
    crop = EvalTransform(SIZE, crop_fraction=0.875)
    images = np.stack([crop(val[i]["image"]) for i in range(len(val))]).astype(np.float32) / 255
    log_probs = jax.nn.log_softmax(teacher.apply(teacher_vars, images))
    nll = -float(np.mean(np.take_along_axis(np.asarray(log_probs), val.labels[:, None], 1)))
    (table,) = [r for r in read_log(tmp_path / "s2") if any(k.startswith("test/") for k in r)]
    (teacher_nll,) = [v for k, v in table.items() if k.startswith("test/") and k.endswith("/nll")
                      and "gendd" not in k.lower()][:1]
    assert teacher_nll == pytest.approx(nll, rel=1e-4)


@pytest.mark.slow
def test_unsupervised_gendd_streams_an_unlabeled_folder(imagenet_like, tmp_path, monkeypatch):
    import gendd
    from data import catalog

    root, data_name, _, _ = imagenet_like
    unlabeled = tmp_path / "unlabeled"
    write_folder(unlabeled, "any", TRAIN_PER_CLASS, np.random.default_rng(5))
    # cc3m's catalog entry, pointed at this folder: <data_root>/cc3m/
    os.rename(unlabeled / "any", tmp_path / "cc3m")
    gendd.main([*run_args(root, data_name, tmp_path / "run"), "--data_name", "cc3m",
                "--data_root", str(tmp_path), "--eval_data_name", data_name, "--unsupervised", "true",
                "--smooth", "0.0", "--gendd_stage", "2"])
    (record,) = [r for r in read_log(tmp_path / "run") if "epoch" in r]
    assert record["step"] == 2 and "train/probe_nll" not in record and "val/acc" in record
    assert catalog.get_streamed_spec("cc3m").num_classes is None
