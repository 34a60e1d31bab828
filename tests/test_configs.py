"""Every shipped YAML parses through the method registry (keys exist, types match, ranges hold)."""
import glob
import os

import pytest

from data import catalog
from data.datasets import get_spec
from utils.config import parse_config
from utils.errors import UserError
from utils.method import config_reader, methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(f, ROOT) for f in FILES])
def test_shipped_config_parses(path):
    config = config_reader(path).parse(["--config", path])
    # a data set of the on-device registry or of the streamed catalog
    if not catalog.is_streamed(config.data_name):
        get_spec(config.data_name)
    for name in (config.data_name, config.eval_data_name):
        if name is not None and catalog.is_streamed(name):
            catalog.get_streamed_spec(name)
    with open(path) as f:
        assert f.readline().startswith("#"), "a config starts with its command and expectations"


def test_every_config_belongs_to_one_reader():
    """No YAML is read by two methods, and each method's globs match at least one YAML."""
    for method in methods().values():
        for pattern in method.config_files:
            assert glob.glob(os.path.join(ROOT, "config", pattern)), (method.name, pattern)
    with pytest.raises(UserError, match="no method reads"):
        config_reader(os.path.join(ROOT, "config", "nowhere", "x.yaml"))


def test_every_method_has_its_three_data_sets():
    names = {os.path.basename(f) for f in FILES}
    for method in ("kd", "endd", "fed", "edfm"):
        for data in ("c10", "c100", "fmnist"):
            assert f"{method}_{data}_frnrelu.yaml" in names
    for data in ("c10", "c100", "fmnist"):
        assert f"{data}_frnrelu_sgd_swag.yaml" in names


STUDENT_METHODS = ["kd_and_endd", "fed", "edfm"]


@pytest.mark.parametrize("name", STUDENT_METHODS)
def test_student_augmentation_keys(name):
    """The spec's CIFAR pipeline by default; each step can be switched, and bad values refused."""
    cls = methods()[name].config_class
    default = parse_config(cls, [])
    assert (default.randaugment, default.crop_padding, default.flip) == (True, 4, True)
    fmnist = parse_config(cls, ["--crop_padding", "1", "--flip", "false", "--randaugment", "false"])
    assert (fmnist.randaugment, fmnist.crop_padding, fmnist.flip) == (False, 1, False)
    with pytest.raises(UserError, match="crop_padding"):
        parse_config(cls, ["--crop_padding", "-1"])
    with pytest.raises(UserError, match="mixup_alpha"):
        parse_config(cls, ["--mixup_alpha", "-0.1"])


@pytest.mark.parametrize("name", sorted(["sgd_swag", "kd_and_endd", "fed", "edfm", "gendd"]))
def test_shared_optimizer_and_range_checks(name):
    """One optimizer key set and one set of range checks in every script: a negative learning
    rate, a momentum of 1 or an unknown optimizer is refused by each."""
    cls = methods()[name].config_class
    for bad in (["--optim_lr", "-0.1"], ["--optim_momentum", "1"], ["--optim", "rmsprop"],
                ["--adam_beta2", "1.0"], ["--optim_weight_decay", "-1"], ["--eval_every", "0"]):
        with pytest.raises(UserError):
            parse_config(cls, bad)


def test_reference_aliases():
    """EDFM's reference keys optim_base and eval_batch_size name the shared optim and eval_bs;
    saying both with different values is refused."""
    cls = methods()["edfm"].config_class
    config = parse_config(cls, ["--optim_base", "adam", "--eval_batch_size", "64"])
    assert (config.optim, config.eval_bs) == ("adam", 64)
    with pytest.raises(UserError, match="disagree"):
        parse_config(cls, ["--optim_base", "adam", "--optim", "sgd"])
