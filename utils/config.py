"""Configuration: YAML into a validated dataclass, every key overridable as `--key value`.

Each script declares its keys as a dataclass that extends `CommonConfig`, then calls
`parse_config(ScriptConfig, argv)`. The order of precedence is: dataclass defaults < the YAML
named by `--config` (or the `config.yaml` saved in the `--resume` run) < command-line flags.
Unknown keys and wrong types raise `UserError` naming the nearest valid keys.
"""
import dataclasses
import datetime
import difflib
import os
import typing
from typing import Optional

import yaml

from utils.errors import UserError

CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class CommonConfig:
    """Keys every entry script understands (the reference's names)."""

    # Run
    save: Optional[str] = None  # run directory; default runs/<script>/<exp_name or time>
    exp_name: Optional[str] = None
    seed: int = 2025
    resume: Optional[str] = None  # a run directory to continue
    wandb: bool = False  # Weights & Biases logging; `--nowandb` turns it off
    wandb_project: str = "edfm"
    log_every: int = 50  # steps between progress-bar metric refreshes and NaN checks
    keep_checkpoints: int = 2  # latest checkpoints kept for resuming
    # Data
    data_name: str = "FashionMNIST_x28"
    data_root: str = "./data/"
    download: bool = False  # fetch a missing data set from its official source
    num_train_examples: Optional[int] = None  # use only the first N training examples
    # Model (the reference's model_* keys)
    model_name: str = "FlaxResNet"
    model_style: str = "FRN-Swish"
    model_depth: int = 32
    model_width: int = 2
    model_planes: int = 16
    model_stem_planes: Optional[int] = None  # stem channels; default model_planes (resnet32x4: 32)
    model_nobias: bool = False
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    # Optimisation
    optim_bs: int = 256
    optim_ne: int = 1000

    def validate(self):
        """Range checks shared by every script; scripts extend this."""
        positive = ["optim_bs", "optim_ne", "model_depth", "model_width", "model_planes", "log_every"]
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        if (self.model_depth - 2) % 6:
            raise UserError(f"model_depth must be 6n+2 (8, 14, 20, 32, ...), got {self.model_depth}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.num_train_examples is not None and self.num_train_examples < 1:
            raise UserError(f"num_train_examples must be >= 1, got {self.num_train_examples}")
        if self.model_name != "FlaxResNet":
            raise UserError(f"model_name must be FlaxResNet, got {self.model_name!r}")
        from models.resnet import parse_style  # local: config must not depend on models at import

        try:
            parse_style(self.model_style)
        except ValueError as error:
            raise UserError(str(error)) from None


@dataclasses.dataclass
class StudentConfig(CommonConfig):
    """Keys of the distillation students' input pipeline (data.augment.configured_pipeline), for
    every script that trains a student on augmented images (KD/ProxyEnDD, FED, EDFM)."""

    mixup_alpha: float = 0.4
    randaugment: bool = True  # RandAugment(2, 9) before crop/flip/mixup (spec §1)
    crop_padding: int = 4  # zero-pad random crop: shifts of up to this many pixels; 0: none
    flip: bool = True  # random horizontal flip

    def validate(self):
        super().validate()
        for key in ("mixup_alpha", "crop_padding"):
            if getattr(self, key) < 0:
                raise UserError(f"config key {key} must be >= 0, got {getattr(self, key)}")


def _nearest(key, valid):
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _coerce(key, value, annotation):
    """Check one value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, annotation)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation in (int, bool, str) and type(value) is annotation:
        return value
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(key, v, args[0]) for v in value]
    if origin is dict and isinstance(value, dict):
        return {_coerce(key, k, args[0]): _coerce(key, v, args[1]) for k, v in value.items()}
    name = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"config key {key} expects {name}, got {value!r}")


def _parse_cli(argv, valid):
    """`--key value` pairs; `--nowandb` alone means `--wandb false`."""
    pairs, i = {}, 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--"):
            raise UserError(f"unexpected argument {flag!r}: options are --key value")
        key = flag[2:].replace("-", "_")
        if key == "nowandb":
            pairs["wandb"], i = False, i + 1
            continue
        if key not in valid and key != "config":
            raise UserError(f"unknown option --{key}{_nearest(key, valid)}")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UserError(f"option --{key} needs a value")
        raw = argv[i + 1]
        # CLI values are read as YAML scalars (1e-3, true, null, [2, 10]); strings stay strings.
        try:
            pairs[key] = yaml.safe_load(raw) if key != "config" else raw
        except yaml.YAMLError:
            pairs[key] = raw
        i += 2
    return pairs


def _read_yaml(path):
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return loaded


def parse_config(cls, argv):
    """Build and validate a `cls` config from `--config FILE` and `--key value` flags."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    cli = _parse_cli(list(argv), fields)
    values = {}
    resume = cli.get("resume")
    if resume is not None:
        saved = os.path.join(str(resume), CONFIG_FILE)
        if not os.path.exists(saved):
            raise UserError(f"--resume {resume}: no {CONFIG_FILE} there, so it is not a run directory")
        values.update(_read_yaml(saved))
    if "config" in cli:
        values.update(_read_yaml(cli.pop("config")))
    values.update(cli)
    for key in values:
        if key not in fields:
            raise UserError(f"unknown config key {key}{_nearest(key, fields)}")
    config = cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})
    config.validate()
    return config


def save_config(config, run_dir):
    path = os.path.join(run_dir, CONFIG_FILE)
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
    return path


def prepare_run_dir(config, script_name: str) -> str:
    """The run directory: `--resume DIR` continues DIR; a fresh `--save DIR` must be empty.

    Refuses, touching nothing, to start a fresh run in a directory that already holds one.
    """
    if config.resume:
        if config.save and os.path.abspath(config.save) != os.path.abspath(config.resume):
            raise UserError(f"--save {config.save} and --resume {config.resume} disagree: give one")
        run_dir = config.resume
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = config.save or os.path.join("runs", script_name, config.exp_name or stamp)
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise UserError(f"run directory {run_dir} already holds a run; pass --resume {run_dir} "
                            f"to continue it, or choose another --save")
        os.makedirs(run_dir, exist_ok=True)
    config.save = run_dir
    save_config(config, run_dir)
    return run_dir
