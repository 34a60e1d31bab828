"""Tests of kd_and_endd.py: the balanced teacher draw it uses (utils/teachers.py), its config, and
the script end to end on generated Fashion-MNIST-shaped data (the losses: tests/models/test_losses.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from utils.errors import UserError
from utils.teachers import balanced_runs, draw_members

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------- balanced teacher draw


def test_balanced_runs_cover_every_run_equally():
    for seed in range(20):
        runs = np.asarray(balanced_runs(jax.random.PRNGKey(seed), 6, 3))
        np.testing.assert_array_equal(np.bincount(runs, minlength=3), [2, 2, 2])
    # M = 7, R = 3: every run gets 2 or 3; the extra member goes to each run about 1/3 of the time
    extra = np.zeros(3)
    draw = jax.jit(jax.vmap(lambda k: balanced_runs(k, 7, 3)))
    for runs in np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 600))):
        counts = np.bincount(runs, minlength=3)
        assert sorted(counts) == [2, 2, 3]
        extra[np.argmax(counts)] += 1
    np.testing.assert_allclose(extra / 600, 1 / 3, atol=0.07)


def test_draw_members_balanced_and_fresh():
    num_runs = 3
    mean = {"w": np.arange(num_runs, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32),
            "b": 10 * np.arange(num_runs, dtype=np.float32)[:, None]}
    zero = jax.tree.map(np.zeros_like, mean)
    draw = jax.jit(draw_members, static_argnums=2)
    members = draw(jax.random.PRNGKey(0), {"mean": mean, "std": zero}, 6)
    runs = np.asarray(members["w"][:, 0]).astype(int)
    np.testing.assert_array_equal(np.bincount(runs, minlength=3), [2, 2, 2])
    np.testing.assert_array_equal(np.asarray(members["b"][:, 0]), 10 * runs)  # leaves agree on the run
    std = jax.tree.map(lambda x: np.full_like(x, 0.1), mean)
    a = draw(jax.random.PRNGKey(1), {"mean": mean, "std": std}, 6)
    b = draw(jax.random.PRNGKey(2), {"mean": mean, "std": std}, 6)
    assert not np.allclose(a["w"], b["w"])  # fresh SWAG noise for every key
    noise = np.asarray(a["w"]) - np.round(np.asarray(a["w"]))
    assert 0.03 < noise.std() < 0.3  # std·ξ around the run's mean


def test_one_noise_draw_covers_every_leaf_and_teachers_get_no_gradient():
    from utils.teachers import draw_members, sample_teacher_logits

    rng = np.random.default_rng(0)
    mean = {"conv": {"kernel": rng.normal(size=(2, 3, 3, 1, 2)).astype(np.float32)},
            "dense": {"bias": rng.normal(size=(2, 4)).astype(np.float32),
                      "kernel": rng.normal(size=(2, 2, 4)).astype(np.float32)}}
    std = jax.tree.map(lambda x: np.full_like(x, 0.5), mean)
    # zero std: every member is exactly one run's mean, 2 of each run for M = 4
    members = draw_members(jax.random.PRNGKey(3), {"mean": mean, "std": jax.tree.map(np.zeros_like, std)}, 4)
    runs = [int(np.argmin([np.abs(members["dense"]["bias"][m] - mean["dense"]["bias"][r]).max()
                           for r in range(2)])) for m in range(4)]
    assert sorted(runs) == [0, 0, 1, 1]
    for m, r in enumerate(runs):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[m], b[r]), members, mean)
    # the noise has the SWAG std in every leaf, independently across leaves
    same = {"mean": jax.tree.map(lambda x: np.repeat(x[:1], 2, axis=0), mean), "std": std}
    noisy = draw_members(jax.random.PRNGKey(4), same, 64)
    deviations = [np.asarray(leaf) - center[0] for leaf, center in
                  zip(jax.tree.leaves(noisy), jax.tree.leaves(mean))]
    for deviation in deviations:
        np.testing.assert_allclose(deviation.std(), 0.5, rtol=0.15)
    assert abs(np.corrcoef(deviations[0][:, 0, 0, 0, 0], deviations[1][:, 0])[0, 1]) < 0.35

    class Linear:
        def apply(self, variables, images):
            return images.reshape(images.shape[0], -1)[:, :2] @ variables["params"]["dense"]["kernel"]

    def through_teachers(images):
        return jnp.sum(sample_teacher_logits(Linear(), {"mean": mean, "std": std},
                                             jax.random.PRNGKey(0), images, 3))

    images = jnp.ones((2, 2, 2, 1))
    np.testing.assert_array_equal(jax.grad(through_teachers)(images), 0.0)


# ------------------------------------------------------------------------------ config


def test_config_validation():
    from kd_and_endd import DistillConfig
    from utils.config import parse_config

    base = ["--baseline_method", "KD"]
    assert parse_config(DistillConfig, base).num_teachers == 30
    bad = [["--baseline_method", "EnDD"], ["--optim_lr", "-1"], ["--num_teachers", "0"],
           ["--optim_momentum", "1.0"], ["--warmup_factor", "2"], ["--dist_temp", "0"],
           ["--optim", "rmsprop"], ["--num_teachers", "x"], ["--lr_schedule", "cos"],
           ["--lr_decay_rate", "0"], ["--lr_decay_epochs", "[0, 10]"], ["--kd_weight", "-1"],
           ["--ce_weight", "0.1"],  # the default mixup_alpha 0.4: no true labels for the CE
           ["--lr_schedule", "step", "--warmup_steps", "10"]]
    for extra in bad:
        with pytest.raises(UserError):
            parse_config(DistillConfig, base + extra)
    crd = parse_config(DistillConfig, base + ["--ce_weight", "0.1", "--mixup_alpha", "0",
                                              "--lr_schedule", "step"])
    assert (crd.ce_weight, crd.kd_weight, crd.lr_decay_epochs) == (0.1, 1.0, [150, 180, 210])
    endd = parse_config(DistillConfig, ["--baseline_method", "ProxyEnDD", "--select_metric", "ens_nll",
                                        "--t_offset", "3"])
    assert endd.t_offset == 3.0 and endd.select_metric == "ens_nll"
    for name in ("kd", "endd"):
        for data in ("c10", "c100", "fmnist"):
            path = os.path.join(ROOT, "config", "distillation", f"{name}_{data}_frnrelu.yaml")
            config = parse_config(DistillConfig, ["--config", path])
            assert config.baseline_method == ("KD" if name == "kd" else "ProxyEnDD")
            with open(path) as f:
                assert f.readline().startswith("#")


# ------------------------------------------------ CRD's KD recipe (RepDistiller train_student.py)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_objective_is_crds_kd_loss():
    """ce_weight 0.1, kd_weight 0.9, one teacher: RepDistiller's `-r 0.1 -a 0.9` loss, 0.1 ·
    CrossEntropyLoss + 0.9 · DistillKL(4), DistillKL being kl_div(log_softmax(s/T),
    softmax(t/T), summed)·T²/B; the defaults give the KL term alone; padded rows count for nothing."""
    from kd_and_endd import DistillConfig, kd_objective
    from utils.config import parse_config

    rng = np.random.default_rng(0)
    batch, classes, temp = 16, 100, 4.0
    student, teacher = 3 * rng.normal(size=(2, batch, classes))
    labels = rng.integers(0, classes, batch)
    p_teacher = np.exp(_log_softmax(teacher / temp))
    loss_div = np.sum(p_teacher * (np.log(p_teacher) - _log_softmax(student / temp))) * temp**2 / batch
    loss_cls = -np.mean(_log_softmax(student)[np.arange(batch), labels])

    def objective(args, pad=0):
        """kd_objective on the batch plus `pad` masked rows of other logits and labels."""
        config = parse_config(DistillConfig, ["--dist_temp", "4", "--mixup_alpha", "0", *args])
        s = np.concatenate([student, student[:pad] + 7])
        t = np.concatenate([teacher, -teacher[:pad]])
        y = np.concatenate([labels, (labels[:pad] + 1) % classes])
        mask = np.arange(batch + pad) < batch
        return float(kd_objective(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)[None],
                                  jnp.asarray(y), jnp.asarray(mask), config))

    crd = ["--ce_weight", "0.1", "--kd_weight", "0.9"]
    np.testing.assert_allclose(objective(crd), 0.1 * loss_cls + 0.9 * loss_div, rtol=1e-5)
    np.testing.assert_allclose(objective(crd, pad=5), 0.1 * loss_cls + 0.9 * loss_div, rtol=1e-5)
    np.testing.assert_allclose(objective([]), loss_div, rtol=1e-5)


def test_step_schedule_is_repdistillers_adjust_learning_rate():
    """lr_schedule step, per optimizer step, equals RepDistiller's SGD learning rate: before each
    1-based epoch it calls adjust_learning_rate, which sets lr = lr0·rate^steps with
    steps = Σ(epoch > lr_decay_epochs) when steps > 0 and otherwise leaves lr as it is."""
    import kd_and_endd
    from utils.config import parse_config
    from utils.optim import warmup_cosine

    spe, epochs, lr0 = 3, 240, 0.05
    config = parse_config(kd_and_endd.DistillConfig, ["--lr_schedule", "step", "--optim_lr", str(lr0),
                                                      "--optim_ne", str(epochs)])
    schedule = jax.jit(jax.vmap(kd_and_endd.learning_rate_schedule(config, spe)))
    per_step = np.asarray(schedule(jnp.arange(epochs * spe)))

    lr, expected = lr0, []  # the optimizer's lr, as train_student.py's epoch loop changes it
    for epoch in range(1, epochs + 1):
        steps = np.sum(epoch > np.asarray([150, 180, 210]))
        if steps > 0:
            lr = lr0 * 0.1**steps
        expected += [lr] * spe
    np.testing.assert_allclose(per_step, expected, rtol=1e-6)
    # the first decay is at the first step of 1-based epoch 151 (0-based step 150·spe)
    np.testing.assert_allclose(per_step[[150 * spe - 1, 150 * spe]], [lr0, lr0 / 10], rtol=1e-6)

    default = parse_config(kd_and_endd.DistillConfig, ["--optim_lr", str(lr0), "--optim_ne", "10"])
    cosine = warmup_cosine(lr0, 10 * spe, 0, 0.01)
    for step in (0, 7, 29):  # the default is the cosine, as before
        assert float(kd_and_endd.learning_rate_schedule(default, spe)(step)) == float(cosine(step))


def test_shipped_c100_kd_configs_are_crds_recipe():
    """Every kd_c100_<pair>.yaml (GenDD's pairs; not the MultiSWAG kd_c100_frnrelu.yaml) is
    RepDistiller's `--distill kd -r 0.1 -a 0.9 -b 0` on all 50000 images, last epoch."""
    import glob

    from kd_and_endd import DistillConfig
    from utils.config import parse_config

    paths = [p for p in sorted(glob.glob(os.path.join(ROOT, "config", "distillation", "kd_c100_*.yaml")))
             if not p.endswith("kd_c100_frnrelu.yaml")]
    assert len(paths) == 14
    for path in paths:
        c = parse_config(DistillConfig, ["--config", path])
        assert (c.baseline_method, c.num_teachers, c.dist_temp, c.ce_weight, c.kd_weight) == (
            "KD", 1, 4.0, 0.1, 0.9), path
        assert (c.lr_schedule, c.lr_decay_epochs, c.lr_decay_rate, c.warmup_steps) == (
            "step", [150, 180, 210], 0.1, 0), path
        assert (c.optim, c.optim_bs, c.optim_ne, c.optim_momentum, c.optim_weight_decay) == (
            "sgd", 64, 240, 0.9, 5e-4), path
        # train_student.py: lr 0.01 for MobileNetV2 (the zoo's mobile_half) and ShuffleV1/V2
        small = c.model_arch in ("mobile_half", "ShuffleV1", "ShuffleV2")
        assert c.optim_lr == (0.01 if small else 0.05), path
        assert (c.mixup_alpha, c.randaugment, c.crop_padding, c.flip) == (0.0, False, 4, True), path
        assert c.train_on_val and c.select_metric is None, path


def test_proxy_endd_refuses_kd_loss_weights(tmp_path, capsys):
    import kd_and_endd

    for extra in (["--ce_weight", "0.1", "--mixup_alpha", "0"], ["--kd_weight", "0.9"]):
        with pytest.raises(SystemExit) as exit_info:
            kd_and_endd.main(["--baseline_method", "ProxyEnDD", *extra, "--save", str(tmp_path / "x"),
                              "--teacher_dir", str(tmp_path / "none")])  # refused before reading it
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "ce_weight" in err and "ProxyEnDD" in err
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------- end to end (tiny)


# `tiny_setup` (data, a 2-device mesh, two teacher runs) lives in tests/conftest.py.


def _common_args(setup, run_dir):
    return ["--data_root", setup["data_root"], "--teacher_dir", setup["teachers"],
            "--optim_bs", "8", "--optim_ne", "1", "--model_depth", "8", "--model_width", "1",
            "--num_teachers", "3", "--log_every", "1", "--save", str(run_dir)]


def _check_run(run_dir, expected_kind, num_members, images, **options):
    from utils.predict import load_predictor, predict
    from utils.trainer import make_mesh

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1 and records[0]["step"] == 2  # 16 examples / batch 8 = 2 steps
    assert np.isfinite(records[0]["train/loss"]) and "val/nll" in records[0]
    with open(os.path.join(run_dir, "model", "sidecar.json")) as f:
        sidecar = json.load(f)
    assert sidecar["kind"] == expected_kind and sidecar["data_name"] == "FashionMNIST_x28"
    assert "nll" in sidecar["val"]
    predictor = load_predictor(str(run_dir), **options)
    assert predictor.num_members == num_members
    logits = predict(predictor, images, batch_size=4, mesh=make_mesh(jax.devices()[:2]))
    assert logits.shape == (len(images), num_members, 10) and np.all(np.isfinite(logits))
    return logits, sidecar


@pytest.mark.slow
def test_kd_two_steps_export_and_predict(tiny_setup, tmp_path):
    import kd_and_endd
    from utils.checkpoints import load_resnet

    run_dir = tmp_path / "kd"
    kd_and_endd.main(["--config", os.path.join(ROOT, "config/distillation/kd_fmnist_frnrelu.yaml"),
                      *_common_args(tiny_setup, run_dir)])
    logits, sidecar = _check_run(run_dir, "resnet", 1, tiny_setup["images"])
    assert sidecar["method"] == "KD" and sidecar["seed"] == 2025
    # EDFM reads the same export as its frozen backbone
    model, variables, _ = load_resnet(str(run_dir / "model"))
    direct = model.apply(variables, tiny_setup["images"].astype(np.float32) / 255.0)
    np.testing.assert_allclose(logits[:, 0], direct, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):  # a fresh run refuses a directory that holds one
        kd_and_endd.main(["--config", os.path.join(ROOT, "config/distillation/kd_fmnist_frnrelu.yaml"),
                          *_common_args(tiny_setup, run_dir)])


@pytest.mark.slow
def test_proxy_endd_two_steps_export_and_predict(tiny_setup, tmp_path):
    import kd_and_endd

    run_dir = tmp_path / "endd"
    kd_and_endd.main(["--config", os.path.join(ROOT, "config/distillation/endd_fmnist_frnrelu.yaml"),
                      *_common_args(tiny_setup, run_dir), "--num_ensembles", "2",
                      "--endd_broadcast_bug", "true"])
    logits, sidecar = _check_run(run_dir, "proxy_endd", 8, tiny_setup["images"])
    assert sidecar["method"] == "ProxyEnDD" and sidecar["s_offset"] == 1.0
    assert "ens_nll" in sidecar["val"] and "softmax_nll" in sidecar["val"]
    probs = np.exp(logits)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-4)
    assert probs.std(axis=1).max() > 1e-3  # the members are distinct Dirichlet samples
    mean_logits, _ = _check_run(run_dir, "proxy_endd", 1, tiny_setup["images"], dirichlet_mean=True)
    np.testing.assert_allclose(np.exp(mean_logits).sum(-1), 1.0, rtol=1e-4)
    # the reference's row: softmax(z) of the network's own logits
    from utils.checkpoints import load_export
    from models.resnet import resnet_from_spec

    z_logits, _ = _check_run(run_dir, "proxy_endd", 1, tiny_setup["images"], softmax_logits=True)
    arrays, sidecar = load_export(str(run_dir / "model"), kind="proxy_endd")
    z = resnet_from_spec(sidecar["model"]).apply({"params": arrays["params"], **arrays.get("model_state", {})},
                                                 tiny_setup["images"].astype(np.float32) / 255.0)
    np.testing.assert_allclose(z_logits[:, 0], z, rtol=1e-4, atol=1e-4)
    assert not np.allclose(jax.nn.softmax(z_logits[:, 0]), np.exp(mean_logits[:, 0]), atol=1e-3)


def test_num_classes_must_match(tiny_setup, tmp_path, capsys):
    import kd_and_endd

    with pytest.raises(SystemExit):
        kd_and_endd.main([*_common_args(tiny_setup, tmp_path / "x"), "--num_classes", "100"])
    assert "num_classes is 100" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")  # nothing written


def test_select_metric_must_be_a_validation_metric(tiny_setup, tmp_path, capsys):
    """KD validates acc/nll only: ens_nll is refused by the driver before anything is written."""
    import kd_and_endd

    with pytest.raises(SystemExit):
        kd_and_endd.main([*_common_args(tiny_setup, tmp_path / "x"), "--select_metric", "ens_nll"])
    err = capsys.readouterr().err.strip()
    assert "select_metric 'ens_nll'" in err and "acc, nll" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_train_on_val_trains_on_both_splits_and_exports_the_last_epoch(tiny_setup, tmp_path):
    """train_on_val: the val images join the training set (more steps per epoch), nothing is
    validated, and the export is the last epoch's state. The full run is in the kd_c100 configs'
    CRD form (step LR, which has not decayed by its one epoch's end; 0.1 CE + 0.9 KL)."""
    import kd_and_endd
    from utils.logging import read_metrics

    crd = ["--lr_schedule", "step", "--optim_lr", "0.05", "--ce_weight", "0.1", "--kd_weight", "0.9",
           "--mixup_alpha", "0"]
    runs = {}
    for name, extra in (("split", []),
                        ("full", ["--train_on_val", "true", "--select_metric", "null", *crd])):
        run_dir = tmp_path / name
        kd_and_endd.main(["--config", os.path.join(ROOT, "config/distillation/kd_fmnist_frnrelu.yaml"),
                          *_common_args(tiny_setup, run_dir), *extra])
        runs[name] = read_metrics(run_dir)[-1]
    assert runs["full"]["step"] > runs["split"]["step"]
    assert "val/acc" in runs["split"] and not any(k.startswith("val/") for k in runs["full"])
    assert runs["full"]["train/lr"] == pytest.approx(0.05) and np.isfinite(runs["full"]["train/loss"])
