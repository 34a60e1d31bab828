"""evaluate.py end to end on tiny generated checkpoints, plus utils/cost.py and utils/plots.py."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluate
from utils import method as method_lib
from utils import cost, metrics, plots
from utils.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == PNG_MAGIC


# ------------------------------------------------------------------------------------- cost
def test_xla_flops_of_a_matmul():
    m, n, k = 8, 24, 40
    count = cost.xla_flops(lambda a, b: a @ b, jnp.ones((m, k)), jnp.ones((k, n)))
    assert count.flops == pytest.approx(2 * m * n * k, rel=0.02)
    assert count.exact_loops and count.bytes_accessed > 0


def test_xla_flops_counts_every_loop_iteration():
    """XLA counts a loop body once; counted per iteration, lax.map over members = vmap."""
    w, x = jnp.ones((6, 16, 32)), jnp.ones((8, 16))
    looped = lambda w, x: jax.lax.map(lambda wi: jax.nn.relu(x @ wi), w, batch_size=1)  # noqa: E731
    vmapped = lambda w, x: jax.vmap(lambda wi: jax.nn.relu(x @ wi))(w)  # noqa: E731
    expected = 6 * 2 * 8 * 16 * 32
    assert cost.xla_flops(looped, w, x).flops == pytest.approx(expected, rel=0.05)
    assert cost.xla_flops(vmapped, w, x).flops == pytest.approx(expected, rel=0.05)
    assert cost.xla_flops(looped, w, x, count_loops=False).flops < expected / 3  # XLA alone


def test_xla_flops_of_a_sharded_loop_count_the_whole_batch():
    """A lax.map over members on a batch sharded over 2 devices counts what one device does for
    the whole batch (the lowered program's global arithmetic, loop iterations included)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    w, x = np.ones((6, 16, 32), np.float32), np.ones((8, 16), np.float32)
    looped = lambda w, x: jax.lax.map(lambda wi: jax.nn.relu(x @ wi), w, batch_size=1)  # noqa: E731

    def flops(num_devices):
        mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
        args = (jax.device_put(w, NamedSharding(mesh, PartitionSpec())),
                jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
        return cost.xla_flops(jax.jit(looped), *args).flops

    assert flops(1) == pytest.approx(6 * 2 * 8 * 16 * 32, rel=0.05)
    assert flops(2) == pytest.approx(flops(1), rel=1e-6)


def test_xla_flops_count_a_draw_cut_into_leaves_once():
    """One normal draw cut into 100 parameter leaves (as a SWAG member is drawn) costs what the
    draw costs: the compiled program's cost analysis counted the draw once per leaf (48x)."""
    sizes = [432, 4608, 16, 16, 16] * 20
    whole = lambda key: 2.0 * jax.random.normal(key, (2, sum(sizes)))  # noqa: E731
    cut = lambda key: [2.0 * leaf for leaf in jnp.split(  # noqa: E731
        jax.random.normal(key, (2, sum(sizes))), np.cumsum(sizes)[:-1], axis=1)]
    key = jax.random.PRNGKey(0)
    assert cost.xla_flops(cut, key).flops == pytest.approx(cost.xla_flops(whole, key).flops, rel=0.02)


@pytest.mark.parametrize("unroll", [1, 3, 5])
def test_xla_flops_of_a_long_nested_scan(unroll):
    """An ODE-like scan with a carry, reversed, inside a jit and a map over 3 members: every
    step of every member counted, whatever the scan's unroll (5 divides 1000, 3 does not)."""
    step_flops = 2 * 8 * 16 * 16

    def ode(x, w):
        step = jax.jit(lambda h, wi: (jnp.tanh(h @ wi), h.sum()))
        return jax.lax.scan(step, x, w, reverse=True, unroll=unroll)

    def members(x, w):
        return jax.lax.map(lambda member_x: ode(member_x, w)[0], x)

    x, w = jnp.ones((3, 8, 16)), jnp.ones((1000, 16, 16))
    count = cost.xla_flops(members, x, w)
    assert count.flops == pytest.approx(3 * 1000 * step_flops, rel=0.1)
    assert (count.scans_counted, count.scans_kept, count.dynamic_loops) == (2, 0, 0)
    assert count.exact_loops


def test_xla_flops_reports_loops_without_a_trip_count():
    x = jnp.ones((8, 16))
    body = lambda c: (c[0] @ c[0].T @ c[0], c[1] + 1)  # noqa: E731
    count = cost.xla_flops(lambda x: jax.lax.while_loop(lambda c: c[1] < 3, body, (x, 0))[0], x)
    assert count.dynamic_loops == 1 and not count.exact_loops
    # a scan inside a while loop stays counted once, and says so
    inner = lambda c: (jax.lax.map(lambda r: r * 2.0, c[0]), c[1] + 1)  # noqa: E731
    count = cost.xla_flops(lambda x: jax.lax.while_loop(lambda c: c[1] < 3, inner, (x, 0))[0], x)
    assert (count.dynamic_loops, count.scans_kept, count.scans_counted) == (1, 1, 0)


def test_measure_latency_positive():
    timing = cost.measure_latency(lambda a: (a @ a).sum(), jnp.ones((64, 64)), warmup=1, repeats=3)
    assert timing["repeats"] == 3 and len(timing["times_s"]) == 3
    assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]
    with pytest.raises(ValueError):
        cost.measure_latency(lambda a: a, jnp.ones(3), repeats=0)


# ------------------------------------------------------------------------------------- plots
def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 200)
    methods = {"Teacher": (conf, rng.random(200) < conf), "KD": (conf ** 0.5, rng.random(200) < conf),
               "EDFM": (conf, rng.random(200) < conf)}
    paths = [
        plots.reliability_diagrams(str(tmp_path / "rel.png"), methods, title="t"),
        plots.diversity_vs_accuracy(str(tmp_path / "div.png"), {
            "A": {"acc": 0.9, "mi": 0.1, "var": 0.02, "shift": [{"acc": 0.7, "mi": 0.3, "var": 0.05}]},
            "B": {"acc": 0.8, "mi": 0.0, "var": 0.0}}),
        plots.sweep_plot(str(tmp_path / "sweep.png"), {"heun": {"x": [1, 3, 5], "acc": [0.5, 0.7, 0.8],
                                                                "nll": [1.0, 0.7, 0.6]}},
                         "NFE", ("acc", "nll"), reference={"label": "teacher", "acc": 0.85}, logx=True),
    ]
    for path in paths:
        assert _is_png(path), path
    # the bins are those of utils.metrics.ece: 10-class predictions whose top probability is conf
    conf, correct = methods["KD"]
    probs = np.concatenate([conf[:, None], np.repeat((1 - conf[:, None]) / 9, 9, axis=1)], axis=1)
    edges, count, mean_conf, acc = plots.reliability_bins(conf, correct, num_bins=15)
    filled = count > 0
    ece = np.sum(count[filled] * np.abs(acc[filled] - mean_conf[filled])) / count.sum()
    assert count.sum() == 200 and len(edges) == 16
    assert ece == pytest.approx(metrics.ece(probs, np.where(correct, 0, 1)), abs=1e-12)
    with pytest.raises(ValueError):
        plots.reliability_diagrams(str(tmp_path / "none.png"), {})


# ------------------------------------------------------------------------------------- config
def test_parse_students_and_config(tmp_path):
    assert evaluate.parse_students("KD=runs/kd,EDFM=runs/edfm") == [
        {"name": "KD", "paths": ["runs/kd"], "options": {}, "sweeps": {}},
        {"name": "EDFM", "paths": ["runs/edfm"], "options": {}, "sweeps": {}}]
    pooled = evaluate.parse_students("[{name: KD x3, ensemble: [a, b, c], sweeps: false}]")
    assert pooled == [{"name": "KD x3", "paths": ["a", "b", "c"], "options": {}, "sweeps": False}]
    assert evaluate.parse_students("[{name: E, path: p, options: {num_members: 4}}]")[0]["options"] == {
        "num_members": 4}
    for bad in ("KD", "KD=a,KD=b", "Teacher=x", "[{name: A}]", "[{name: A, path: p, extra: 1}]",
                "[{name: A, path: p, ensemble: [q]}]", "[{name: A, ensemble: []}]",
                "[{name: A, path: p, sweeps: 3}]"):
        with pytest.raises(UserError):
            evaluate.parse_students(bad)
    # an evaluate YAML is strict; another script's YAML lends only its data and teacher keys
    own = tmp_path / "eval.yaml"
    own.write_text("data_name: CIFAR10_x32\nstudents: [{name: KD, path: a}]\neval_bs: 64\n")
    config = evaluate.parse_evaluate_config(["--config", str(own), "--eval_bs", "32"])
    assert (config.data_name, config.eval_bs, config.students[0]["paths"]) == ("CIFAR10_x32", 32, ["a"])
    config = evaluate.parse_evaluate_config(["--config", str(own), "--students", "B=b"])
    assert config.students == [{"name": "B", "paths": ["b"], "options": {}, "sweeps": {}}]
    own.write_text("w2: true\nlatency_repeat: 1\n")
    with pytest.raises(UserError, match="did you mean latency_repeats"):
        evaluate.parse_evaluate_config(["--config", str(own)])
    foreign = tmp_path / "train.yaml"
    foreign.write_text("data_name: CIFAR100_x32\ndata_root: /d\noptim_lr: 0.1\nstart_swa_epoch: 3\n"
                       "teacher_dir: t\nseed: 7\n")
    config = evaluate.parse_evaluate_config(["--config", str(foreign)])
    assert (config.data_name, config.data_root, config.teacher_dir, config.seed) == (
        "CIFAR100_x32", "/d", "t", evaluate.EvaluateConfig.seed)
    with pytest.raises(UserError):
        evaluate.parse_evaluate_config(["--resume", str(tmp_path)])


# ------------------------------------------------------------------------------------- end to end
def _fake_flow_method():
    """A registered stand-in method: a linear classifier whose M members are its logits plus
    noise that shrinks with the number of steps (euler noisier than heun_exp), with EDFM's
    sweep hook (members; steps of heun_exp and euler)."""
    from edfm import sweeps
    from utils.checkpoints import read_sidecar
    from utils.method import Method
    from utils.predict import Predictor

    def load_predictor(model_dir, num_members=4, num_steps=3, solver="heun_exp", seed=0):
        sidecar = read_sidecar(model_dir, kind="fake_flow")
        w = np.load(os.path.join(model_dir, "w.npy"))
        scale = (2.0 if solver == "euler" else 1.0) / num_steps

        def member_logits(args, images, key):
            logits = images.reshape(images.shape[0], -1) @ args["w"]
            noise = jax.random.normal(key, (images.shape[0], num_members, logits.shape[-1]))
            return logits[:, None, :] + scale * noise

        return Predictor(name=f"Flow ({num_members})", kind="fake_flow", member_logits=member_logits,
                         args={"w": w}, num_members=num_members, num_params=w.size, sidecar=sidecar)

    return Method(name="fake_flow", config_class=object, build=None, load_predictor=load_predictor,
                  export_kinds=("fake_flow",), sweeps=sweeps)


@pytest.mark.slow
def test_evaluate_end_to_end(tmp_path, fake_fmnist_root, monkeypatch):
    import sgd_swag
    from models.resnet import ResNet
    from utils.checkpoints import save_resnet

    root = fake_fmnist_root  # train/val/test 256/64/64
    teachers = tmp_path / "teachers"
    sgd_swag.main(["--data_root", root, "--model_depth", "8", "--model_width", "1", "--model_planes", "8",
                   "--optim_ne", "2", "--optim_bs", "64", "--start_decay_epoch", "1", "--start_swa_epoch", "1",
                   "--save", str(teachers / "seed1"), "--seed", "1"])
    # A "resnet" student (KD's export format), randomly initialised.
    kd = ResNet(num_classes=10, depth=8, width=1, planes=8, pixel_mean=(0.286,),
                pixel_std=(0.353,))
    variables = kd.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)))
    save_resnet(str(tmp_path / "kd" / "model"), kd, variables["params"], {}, data_name="FashionMNIST_x28",
                method="KD")
    variables2 = kd.init(jax.random.PRNGKey(4), jnp.zeros((1, 28, 28, 1)))
    save_resnet(str(tmp_path / "kd2" / "model"), kd, variables2["params"], {},
                data_name="FashionMNIST_x28", method="KD")
    # A fake flow export, predicted by a fake registered method through the real dispatch.
    edfm_dir = tmp_path / "edfm" / "model"
    edfm_dir.mkdir(parents=True)
    (edfm_dir / "sidecar.json").write_text(json.dumps({"kind": "fake_flow", "data_name": "FashionMNIST_x28"}))
    np.save(edfm_dir / "w.npy", np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32) * 0.05)
    method_lib.methods()  # discover the real ones first
    monkeypatch.setitem(method_lib._METHODS, "fake_flow", _fake_flow_method())

    save = tmp_path / "eval"
    config_file = tmp_path / "eval.yaml"
    # "Self" is the teacher run itself with the same samples: its fidelity must be perfect.
    config_file.write_text(f"""
data_name: FashionMNIST_x28
data_root: {root}
teacher_dir: {teachers}
teacher_samples_per_run: 2
students:
  - {{name: KD, path: {tmp_path / 'kd'}}}
  - {{name: Self, path: {teachers / 'seed1'}, options: {{samples_per_run: 2, seed: 0}}}}
  - {{name: EDFM, path: {tmp_path / 'edfm'}, options: {{num_members: 3}},
     sweeps: {{members: [1, 3], steps: [2]}}}}
  - {{name: KD x2, ensemble: [{tmp_path / 'kd'}, {tmp_path / 'kd2'}]}}
seed: 0
eval_bs: 64
num_test_examples: 48
latency_bs: 16
latency_repeats: 2
latency_warmup: 1
""")
    out = evaluate.main(["--config", str(config_file), "--save", str(save)])

    text = (save / "results.md").read_text()
    results = json.loads((save / "results.json").read_text())
    teacher_name = "Teacher (1x2)"
    main_table = text.split("\n\n")[3].splitlines()  # title, info, definitions, table
    header = [c.strip() for c in main_table[0].strip("|").split("|")]
    assert header == ["Method"] + [h for h, _, _ in evaluate.main_columns(16, results["methods"])]
    assert "Top-5 (%)" in header and "Many-shot acc (%)" not in header  # 10 classes, no shot groups
    for required in ("Acc (%)", "Top-5 (%)", "NLL", "ECE (%)", "Brier", "KL to teacher", "Agreement (%)", "AMB",
                     "Brier var", "MI", "Disagreement", "W2", "OOD AUROC entropy (%)", "OOD AUROC MI (%)",
                     "Shift acc (%)", "Shift NLL", "Params", "FLOPs/input", "Members"):
        assert required in header, required
    assert any(h.startswith("Latency/batch") for h in header)
    rows = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in main_table[2:]}
    assert list(rows) == [teacher_name, "KD", "Self", "EDFM", "KD x2"]
    one_member = {"AMB", "Brier var", "MI", "Disagreement", "OOD AUROC MI (%)"}  # no spread
    for name, cells in rows.items():
        assert len(cells) == len(header)
        blank = {header[i] for i, c in enumerate(cells) if c == "—"}
        expected = ({"KL to teacher", "Agreement (%)", "W2"} if name == teacher_name
                    else one_member if name == "KD" else set())
        assert blank == expected, name
    # one table per shift set (12 Fashion-MNIST corruptions), the OOD set, the sweeps
    for corruption in ("rotation", "gaussian_noise", "blur", "contrast"):
        for severity in (1, 2, 3):
            assert f"### {corruption}_s{severity}\n" in text
    assert "digits AUROC entropy (%)" in text and "### EDFM: members" in text
    assert "### EDFM: heun_exp steps" in text and "### EDFM: euler steps" in text
    for png in ("reliability.png", "diversity_vs_accuracy.png", "edfm_members.png",
                "edfm_heun_exp_steps.png", "edfm_euler_steps.png"):
        assert _is_png(save / png), png
        assert f"]({png})" in text

    # The numbers: the teacher run as a student is the teacher; KD matches a direct computation.
    methods = results["methods"]
    self_test = methods["Self"]["test"]
    assert self_test["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert self_test["agreement"] == 1.0 and self_test["w2"] == pytest.approx(0, abs=1e-3)
    assert self_test["acc"] == methods[teacher_name]["test"]["acc"]
    assert all(s["kl_to_teacher"] == pytest.approx(0, abs=1e-6) for s in methods["Self"]["shift"].values())
    from data.datasets import load_dataset

    test = load_dataset("FashionMNIST_x28", root).test
    kd_logits = np.asarray(kd.apply(variables, test.images[:48] / 255.0))[:, None, :]
    assert methods["KD"]["test"]["acc"] == pytest.approx(metrics.accuracy(metrics.softmax(kd_logits[:, 0]),
                                                                          test.labels[:48]))
    assert methods["KD"]["test"]["nll"] == pytest.approx(
        metrics.nll(metrics.softmax(kd_logits[:, 0]), test.labels[:48]), rel=1e-4)
    assert methods["KD"]["test"]["top5"] == pytest.approx(metrics.top_k_accuracy(
        metrics.softmax(kd_logits[:, 0]), test.labels[:48], 5))
    assert methods["KD"]["num_members"] == 1 and methods["KD"]["test"]["mi"] is None
    assert methods["KD"]["ood"]["digits"]["auroc_mi"] is None
    # the pooled ensemble of two KD exports: 2 members, the mean of their softmaxes
    kd2_logits = np.asarray(kd.apply(variables2, test.images[:48] / 255.0))[:, None, :]
    pooled = metrics.ensemble_probs(np.concatenate([kd_logits, kd2_logits], axis=1))
    assert methods["KD x2"]["num_members"] == 2 and methods["KD x2"]["test"]["mi"] > 0
    assert methods["KD x2"]["test"]["nll"] == pytest.approx(metrics.nll(pooled, test.labels[:48]),
                                                            rel=1e-4)
    assert "KD x2" not in results["sweeps"]  # a resnet's method has no sweeps
    assert np.isfinite(methods["KD"]["test"]["w2"]) and methods["KD"]["test"]["w2"] > 0
    assert methods["EDFM"]["num_members"] == 3 and methods["EDFM"]["test"]["mi"] > 0
    assert len(results["shift_sets"]) == 12 and results["ood_sets"] == ["digits"]
    for m in methods.values():
        assert 0 <= m["ood"]["digits"]["auroc_entropy"] <= 1
        c = m["cost"]
        assert c["num_params"] > 0 and c["flops_per_input"] > 0 and c["latency_s"] > 0
        assert c["batch_size"] == 16 and c["flops_exact_loops"]
    # the teacher's FLOPs are its 2 members' (run in a loop on CPU), KD has the same network
    assert methods[teacher_name]["cost"]["flops_per_input"] == pytest.approx(
        2 * methods["KD"]["cost"]["flops_per_input"], rel=0.02)
    assert methods[teacher_name]["cost"]["flops_per_input"] == pytest.approx(
        methods["Self"]["cost"]["flops_per_input"], rel=1e-6)
    assert methods[teacher_name]["cost"]["num_params"] == 2 * methods["KD"]["cost"]["num_params"]
    sweep = results["sweeps"]["EDFM"]
    assert [p["num_members"] for p in sweep["members"]["points"]] == [1, 3]
    assert [p["x"] for p in sweep["heun_exp steps"]["points"]] == [3]  # NFE: 2(S-1)+1
    assert [p["x"] for p in sweep["euler steps"]["points"]] == [2]
    assert sweep["euler steps"]["points"][0]["options"] == {"num_steps": 2, "solver": "euler"}
    assert sweep["members"]["points"][0]["mi"] is None and sweep["members"]["points"][1]["mi"] > 0
    assert out["run_dir"] == str(save)
    # per_example.npz: each method's per-image NLL and KL to the teacher; KD's recomputed directly
    per_example = np.load(save / "per_example.npz")
    names = list(per_example["names"])
    assert names == [teacher_name, "KD", "Self", "EDFM", "KD x2"]
    assert per_example["nll"].shape == per_example["kl_to_teacher"].shape == (5, 48)
    np.testing.assert_array_equal(per_example["labels"], test.labels[:48])
    for index, name in enumerate(names):
        assert per_example["nll"][index].mean() == pytest.approx(methods[name]["test"]["nll"], rel=1e-5)
        kl = per_example["kl_to_teacher"][index]
        assert kl.mean() == pytest.approx(methods[name]["test"].get("kl_to_teacher") or 0, abs=1e-6)
    np.testing.assert_allclose(per_example["nll"][1], -np.log(metrics.softmax(kd_logits[:, 0])[
        np.arange(48), test.labels[:48]]), rtol=1e-4)
    assert (per_example["kl_to_teacher"][0] == 0).all() and (per_example["kl_to_teacher"][1] > 0).all()
    # aggregate.py reads this format: the same evaluation twice has std 0, a zero-width interval
    import aggregate

    over_two = aggregate.main(["--evaluations", str(save), str(save), "--save", str(tmp_path / "agg")])
    assert over_two["table"]["KD"]["nll"]["mean"] == pytest.approx(methods["KD"]["test"]["nll"])
    assert over_two["table"]["KD"]["nll"]["std"] == 0 and over_two["table"]["KD x2"]["nll"]["n"] == 2
    difference = methods["EDFM"]["test"]["nll"] - methods["KD"]["test"]["nll"]
    seeds, images = (over_two["paired"]["KD"]["nll"][over] for over in ("seeds", "images"))
    assert seeds["mean"] == pytest.approx(difference) and seeds["low"] == pytest.approx(seeds["high"])
    assert images["mean"] == pytest.approx(difference, rel=1e-4) and images["n"] == 48
    assert over_two["sweeps"]["members"]["x"] == [1, 3] and "Self" in over_two["paired"]

    # Nothing is overwritten.
    before = (save / "results.md").read_text()
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--config", str(config_file), "--save", str(save)])
    assert info.value.code == 2 and (save / "results.md").read_text() == before
    assert re.search(r"\| KD \|", before)


@pytest.mark.slow
def test_evaluate_long_tailed_shot_groups_and_top5(tmp_path, fake_fmnist_root, monkeypatch):
    """long_tail_ratio and shot_thresholds on an on-device set: the many-, medium- and few-shot
    accuracies (and top-5) of each row equal utils.metrics on predictions made here, the class
    groups counted here from the long-tailed training split."""
    from data.datasets import load_dataset, long_tailed
    from models.resnet import ResNet
    from utils.checkpoints import save_resnet

    root = fake_fmnist_root  # class c: a bright band on rows 2c+2 .. 2c+4
    teacher = ResNet(num_classes=10, depth=8, width=1, planes=8, pixel_mean=(0.286,), pixel_std=(0.353,))
    variables = teacher.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)))
    save_resnet(str(tmp_path / "teacher" / "model"), teacher, variables["params"], {},
                data_name="FashionMNIST_x28")
    # A linear student that reads the bands, with classes 1 and 8 swapped: those two always wrong.
    bands = np.zeros((28, 28, 10), np.float32)
    for c in range(10):
        bands[2 + 2 * c: 5 + 2 * c, :, c] = 0.1
    w = bands[:, :, [0, 8, 2, 3, 4, 5, 6, 7, 1, 9]].reshape(784, 10)
    flow_dir = tmp_path / "flow" / "model"
    flow_dir.mkdir(parents=True)
    (flow_dir / "sidecar.json").write_text(json.dumps({"kind": "fake_flow", "data_name": "FashionMNIST_x28"}))
    np.save(flow_dir / "w.npy", w)
    method_lib.methods()
    monkeypatch.setitem(method_lib._METHODS, "fake_flow", _fake_flow_method())

    save = tmp_path / "eval"
    out = evaluate.main(["--data_root", root, "--teacher_dir", str(tmp_path / "teacher"),
                         "--teacher_samples_per_run", "1", "--students",
                         f"[{{name: Bands, path: {tmp_path / 'flow'}, options: {{num_members: 2, num_steps: 1000}}}}]",
                         "--long_tail_ratio", "10", "--shot_thresholds", "[15, 5]", "--eval_shift", "false",
                         "--w2", "false", "--sweeps", "false", "--num_test_examples", "48", "--eval_bs", "16",
                         "--latency_bs", "4", "--latency_repeats", "1", "--latency_warmup", "0",
                         "--save", str(save)])
    dataset = load_dataset("FashionMNIST_x28", root)
    counts = np.bincount(long_tailed(dataset.train, 10, 10.0).labels, minlength=10)
    assert list(counts) == [25, 19, 14, 11, 8, 6, 5, 4, 3, 2]  # many: 0-1, medium: 2-6, few: 7-9
    images, labels = dataset.test.images[:48], dataset.test.labels[:48]
    flat = images.reshape(48, -1) / 255.0
    expected = {"Teacher (1x1)": metrics.softmax(np.asarray(teacher.apply(variables, images / 255.0))),
                "Bands": metrics.softmax(flat @ w)}
    results = json.loads((save / "results.json").read_text())["methods"]
    for name, probs in expected.items():
        test = results[name]["test"]
        shots = metrics.shot_accuracies(probs, labels, counts, many=15, few=5)
        assert {k: test[k] for k in shots} == pytest.approx(shots), name
        assert test["top5"] == pytest.approx(metrics.top_k_accuracy(probs, labels, 5)), name
    # classes 1 (many) and 8 (few) are always wrong, the others right: the groups tell them apart
    assert {k: results["Bands"]["test"][k] for k in ("many_acc", "medium_acc", "few_acc")} == pytest.approx(
        {"many_acc": 0.5, "medium_acc": 1.0, "few_acc": 2 / 3})
    header = [c.strip() for c in out["table"].splitlines()[0].strip("|").split("|")]
    assert header[1:6] == ["Acc (%)", "Top-5 (%)", "Many-shot acc (%)", "Medium-shot acc (%)",
                           "Few-shot acc (%)"]
    bands_row = [c.strip() for c in out["table"].splitlines()[3].strip("|").split("|")]
    assert bands_row[0] == "Bands" and bands_row[3:6] == ["50.00", "100.00", "66.67"]
    assert "Many-shot: classes with more than 15 training images" in (save / "results.md").read_text()
