"""Configuration: YAML into a validated dataclass, every key overridable as `--key value`.

Each script declares its keys as a dataclass that extends `CommonConfig`, then calls
`parse_config(ScriptConfig, argv)`. The order of precedence is: dataclass defaults < the YAML
named by `--config` (or the `config.yaml` saved in the `--resume` run) < command-line flags.
Unknown keys and wrong types raise `UserError` naming the nearest valid keys.

One key set across the scripts: the keys every script shares live in `CommonConfig` once (run,
data, model, optimizer, selection, test table) with their range checks. A config class may map
the reference's other names onto them (`ALIASES`, e.g. EDFM's `optim_base` -> `optim`), so the
reference's YAMLs parse unchanged, and lists the keys it accepts only for compatibility
(`UNUSED`: read, checked for type, never used).
"""
import ast
import dataclasses
import datetime
import difflib
import inspect
import io
import os
import sys
import textwrap
import tokenize
import typing
from typing import ClassVar, List, Optional

import yaml

from utils.errors import UserError

CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class CommonConfig:
    """Keys every entry script understands (the reference's names)."""

    # Run
    save: Optional[str] = None  # run directory; default runs/<script>/<exp_name or time>
    exp_name: Optional[str] = None  # run name: the default run directory's last part and the W&B run name
    seed: int = 2025  # seeds initialisation, data order, augmentation and sampling
    resume: Optional[str] = None  # a run directory to continue
    wandb: bool = False  # Weights & Biases logging; `--nowandb` turns it off
    wandb_project: str = "edfm"  # W&B project
    log_every: int = 50  # steps between progress-bar metric refreshes and divergence checks
    divergence_factor: float = 1e4  # stop when |loss| > this x max(1, |first logged loss|); 0: off
    keep_checkpoints: int = 2  # latest checkpoints kept for resuming
    # Data
    data_name: str = "FashionMNIST_x28"  # FashionMNIST_x28, CIFAR10_x32, CIFAR100_x32, ... (data/datasets.py)
    data_root: str = "./data/"  # where data sets are looked for (and downloaded to)
    download: bool = False  # fetch a missing data set from its official source
    num_train_examples: Optional[int] = None  # use only the first N training examples
    train_on_val: bool = False  # train on the train and val splits (CIFAR: all 50,000, as GenDD's reference); export the last epoch
    # data.datasets.long_tailed: class c keeps n_max x ratio^(-c/(C-1)) training images
    long_tail_ratio: Optional[float] = None  # make an on-device training split long-tailed (val, test stay balanced)
    shot_thresholds: Optional[List[int]] = None  # [many, few]: also many- (> many train images), medium- and few-shot (< few) accuracy
    # Streaming (data/stream.py): sets that do not fit on a device are read by grain workers
    input_pipeline: str = "auto"  # device | stream | auto: device for data/datasets.py's sets, else stream
    data_workers: int = 4  # stream: grain worker processes per host; 0: read in the main process
    eval_data_name: Optional[str] = None  # stream: take val and test from this set (cc3m runs: imagenet2012)
    image_size: Optional[int] = None  # stream: side of training crops and evaluation images; null: the set's
    train_crop: str = "random_resized"  # stream: random_resized | pad (crop_padding, as on the device) | none
    rrc_scale: List[float] = dataclasses.field(  # stream: RandomResizedCrop's range of area fractions
        default_factory=lambda: [0.08, 1.0])
    rand_augment: Optional[List[float]] = None  # stream: RandAugment [n, m] in the workers; null: none
    color_jitter: float = 0.0  # stream: ColorJitter strength (brightness = contrast = saturation)
    eval_crop_fraction: float = 0.875  # stream: evaluation resizes to image_size / this, then centre-crops
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (long epochs); 0: epoch ends only
    # Model (the reference's model_* keys)
    model_name: str = "FlaxResNet"  # FlaxResNet (the reference's only choice)
    model_arch: Optional[str] = None  # a models.zoo network (resnet8x4, wrn_16_2, ...); null: model_*
    model_style: str = "FRN-Swish"  # normalisation-activation: FRN-Swish | BN-ReLU | FRN-ReLU | BN-Swish
    model_depth: int = 32  # 6n+2 layers (8, 14, 20, 32, ...)
    model_width: int = 2  # channel multiplier of every stage
    model_planes: int = 16  # channels of the first stage at width 1
    model_stem_planes: Optional[int] = None  # stem channels; default model_planes (resnet32x4: 32)
    model_nobias: Optional[bool] = False  # convolutions without biases (null, as the reference's YAMLs: false)
    model_classifier_init: str = "he_normal"  # the classifier's init: he_normal (reference) | lecun_normal (Flax's; runs before 2026-12-02)
    # The reference's other model keys, accepted so its YAMLs parse unchanged (UNUSED below): a
    # value that would change the network is refused
    model_blocks: Optional[str] = None  # the reference's blocks per stage "n,n,n"; only (model_depth-2)/6 each
    first_conv: Optional[str] = None  # the reference's K,S,P stem conv; only null (the 3x3 stride-1 stem)
    first_pool: Optional[str] = None  # the reference's K,S,P max pool after the stem; only null (no pool)
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    # Optimisation (utils/optim.make_optimizer); each script sets its own defaults
    optim_bs: int = 256  # global batch size (over all devices)
    optim_ne: int = 1000  # epochs
    optim: str = "sgd"  # sgd: heavy-ball momentum, L2 added to the gradient | adam: AdamW
    optim_lr: float = 0.1  # peak learning rate
    optim_momentum: float = 0.9  # sgd
    optim_weight_decay: float = 5e-4  # sgd: L2 on the gradient; adam: decoupled, scaled by the lr
    adam_beta1: float = 0.9  # adam: decay of the first moment
    adam_beta2: float = 0.999  # adam: decay of the second moment
    adam_eps: float = 1e-8  # adam: added to the root of the second moment
    # Validation, selection and the end-of-run test table
    eval_every: int = 1  # epochs between validations (the last epoch always validates)
    select_metric: Optional[str] = None  # validation metric that picks the export; null: the last
    test_table: bool = False  # end with a test-set table: the teacher ensemble and the export
    teacher_samples_per_run: int = 3  # SWAG samples per teacher run in that table
    teacher_mode: str = "swag"  # that table's teacher: swag (runs x samples) | swa_means (a mean per run)
    eval_bs: int = 500  # inputs per prediction batch of that table

    ALIASES: ClassVar[dict] = {}  # the reference's name -> this project's key
    # Whether the method trains on the soft labels a stream's mixing makes (mixup_alpha,
    # cutmix_alpha, label_smoothing keys; utils.data_loading.mixing_of)
    STREAM_SOFT_LABELS: ClassVar[bool] = False
    UNUSED: ClassVar[tuple] = ("model_blocks", "first_conv", "first_pool")  # accepted, never used (+ subclass's)

    def __init_subclass__(cls, **kwargs):
        """A subclass's UNUSED lists its own keys; the inherited ones are added here."""
        super().__init_subclass__(**kwargs)
        inherited = tuple(key for base in cls.__mro__[1:] for key in getattr(base, "UNUSED", ()))
        cls.UNUSED = tuple(dict.fromkeys(inherited + tuple(cls.__dict__.get("UNUSED", ()))))

    def validate(self):
        """Range checks shared by every script; scripts extend this."""
        positive = ["optim_bs", "optim_ne", "model_depth", "model_width", "model_planes", "log_every",
                    "eval_every", "teacher_samples_per_run", "eval_bs"]
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        if self.teacher_mode not in ("swag", "swa_means"):
            raise UserError(f"teacher_mode must be swag or swa_means, got {self.teacher_mode!r}")
        if self.optim not in ("sgd", "adam", "adamw"):
            raise UserError(f"optim must be sgd or adam (AdamW), got {self.optim!r}")
        ranges = [("optim_lr", self.optim_lr > 0, "> 0"),
                  ("optim_momentum", 0 <= self.optim_momentum < 1, "in [0, 1)"),
                  ("optim_weight_decay", self.optim_weight_decay >= 0, ">= 0"),
                  ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"),
                  ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
                  ("adam_eps", self.adam_eps > 0, "> 0"),
                  ("divergence_factor", self.divergence_factor >= 0, ">= 0")]
        for key, ok, rule in ranges:
            if not ok:
                raise UserError(f"config key {key} must be {rule}, got {getattr(self, key)}")
        if (self.model_depth - 2) % 6:
            raise UserError(f"model_depth must be 6n+2 (8, 14, 20, 32, ...), got {self.model_depth}")
        if self.model_classifier_init not in ("he_normal", "lecun_normal"):
            raise UserError(f"model_classifier_init must be he_normal or lecun_normal, got "
                            f"{self.model_classifier_init!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        self.validate_streaming()
        if self.num_train_examples is not None and self.num_train_examples < 1:
            raise UserError(f"num_train_examples must be >= 1, got {self.num_train_examples}")
        if self.model_name != "FlaxResNet":
            raise UserError(f"model_name must be FlaxResNet, got {self.model_name!r}")
        if self.model_arch is not None:
            from models.zoo import canonical_arch  # local, as parse_style below

            try:
                self.model_arch = canonical_arch(self.model_arch)
            except ValueError as error:
                raise UserError(f"model_arch: {error}") from None
        self.validate_reference_model_keys()
        from models.resnet import parse_style  # local: config must not depend on models at import

        try:
            parse_style(self.model_style)
        except ValueError as error:
            raise UserError(str(error)) from None

    def validate_streaming(self):
        if self.input_pipeline not in ("auto", "device", "stream"):
            raise UserError(f"input_pipeline must be auto, device or stream, got {self.input_pipeline!r}")
        if self.train_crop not in ("random_resized", "pad", "none"):
            raise UserError(f"train_crop must be random_resized, pad or none, got {self.train_crop!r}")
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise UserError(f"rrc_scale must be [min, max] with 0 < min <= max <= 1, got {self.rrc_scale}")
        if self.rand_augment is not None and (len(self.rand_augment) != 2 or self.rand_augment[0] < 1
                                              or not 0 <= self.rand_augment[1] <= 10):
            raise UserError(f"rand_augment must be [n >= 1, m in 0..10] or null, got {self.rand_augment}")
        if self.long_tail_ratio is not None and self.long_tail_ratio < 1:
            raise UserError(f"long_tail_ratio must be >= 1 (or null), got {self.long_tail_ratio}")
        if self.shot_thresholds is not None and (len(self.shot_thresholds) != 2
                                                 or not 0 <= self.shot_thresholds[1] <= self.shot_thresholds[0]):
            raise UserError(f"shot_thresholds must be [many, few] with 0 <= few <= many, got "
                            f"{self.shot_thresholds}")
        ranges = [("data_workers", self.data_workers >= 0, ">= 0"),
                  ("image_size", self.image_size is None or self.image_size >= 1, ">= 1 or null"),
                  ("color_jitter", self.color_jitter >= 0, ">= 0"),
                  ("eval_crop_fraction", 0 < self.eval_crop_fraction <= 1, "in (0, 1]"),
                  ("checkpoint_every", self.checkpoint_every >= 0, ">= 0")]
        for key, ok, rule in ranges:
            if not ok:
                raise UserError(f"config key {key} must be {rule}, got {getattr(self, key)}")

    def validate_reference_model_keys(self):
        """The reference's model_nobias null is false; its model_blocks, first_conv and
        first_pool are accepted only with values that build the network this project builds."""
        if self.model_nobias is None:
            self.model_nobias = False
        if self.model_blocks is not None:
            per_stage = (self.model_depth - 2) // 6
            try:
                blocks = [int(b) for b in str(self.model_blocks).split(",")]
            except ValueError:
                blocks = None
            if blocks != [per_stage] * 3:
                raise UserError(f"model_blocks {self.model_blocks!r} is not {per_stage},{per_stage},{per_stage}: "
                                f"this ResNet has (model_depth-2)/6 blocks in each of its 3 stages; set it to null")
        for key, what in (("first_conv", "a K,S,P stem conv"), ("first_pool", "a max pool after the stem")):
            if getattr(self, key):  # null or "" (the reference's `if not first_conv`): none
                raise UserError(f"{key} {getattr(self, key)} asks for {what}, which this ResNet does not build "
                                f"(the CIFAR 3x3 stride-1 stem, no pool); set it to null")


@dataclasses.dataclass
class StudentConfig(CommonConfig):
    """Keys of every script that distills a teacher ensemble into a student trained on augmented
    images (KD/ProxyEnDD, FED, EDFM, Hydra): the teachers and the input pipeline
    (data.augment.configured_pipeline)."""

    teacher_dir: str = "checkpoints_teacher/fmnist"  # the teacher ensemble: a folder of runs
    num_classes: Optional[int] = None  # taken from the data set; if given, it must match
    mixup_alpha: float = 0.4  # mixup Beta(α, α); 0: none
    randaugment: bool = True  # RandAugment(2, 9) before crop/flip/mixup (spec §1)
    randaugment_contrast: str = "tf_models"  # its Contrast blends to: tf_models (the reference's level, batch pixels/256) | mean (the image's mean gray)
    crop_padding: int = 4  # zero-pad random crop: shifts of up to this many pixels; 0: none
    flip: bool = True  # random horizontal flip

    def validate(self):
        super().validate()
        if self.randaugment_contrast not in ("tf_models", "mean"):
            raise UserError(f"randaugment_contrast must be tf_models or mean, got {self.randaugment_contrast!r}")
        for key in ("mixup_alpha", "crop_padding"):
            if getattr(self, key) < 0:
                raise UserError(f"config key {key} must be >= 0, got {getattr(self, key)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2 (or null), got {self.num_classes}")


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
    except OSError as error:
        raise UserError(f"cannot read the config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return loaded


def _canonical(cls, values: dict, source: str) -> dict:
    """`values` with the reference's key names (cls.ALIASES) renamed to this project's."""
    values = dict(values)
    for alias, key in cls.ALIASES.items():
        if alias in values:
            if key in values and values[key] != values[alias]:
                raise UserError(f"{source}: {alias} and {key} name the same setting and disagree "
                                f"({values[alias]!r} vs {values[key]!r})")
            values[key] = values.pop(alias)
    return values


def key_meanings(cls) -> dict:
    """{key: its one-line meaning}, read from the comment at the end of the field's line in the
    config classes' source, so the help that `--help` prints cannot drift from the code. A
    subclass's comment overrides its base's; a field redeclared without one keeps the base's."""
    meanings = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        lines = source.splitlines()
        comments = {token.start[0]: token.string.lstrip("#").strip()
                    for token in tokenize.generate_tokens(io.StringIO(source).readline)
                    if token.type == tokenize.COMMENT}
        for node in ast.parse(source).body[0].body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            meaning = " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1)
                               if n in comments and not lines[n - 1].lstrip().startswith("#"))
            if meaning or node.target.id not in meanings:
                meanings[node.target.id] = meaning
    return meanings


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type_name(inner)}|null"
    if args:
        return f"{typing.get_origin(annotation).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def config_help(cls, prog: str) -> str:
    """What `--help` prints: usage, then every key with its type, default and meaning, then the
    reference's names that are accepted (aliases and unused keys)."""
    hints = typing.get_type_hints(cls)
    meanings = key_meanings(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()
        rows.append((f"--{field.name}", _type_name(hints[field.name]), yaml.safe_dump(
            default, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip(),
            meanings.get(field.name, "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    about = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]  # the script's
    lines = [f"usage: python {prog} [--config FILE.yaml] [--resume RUN_DIR] [--key value ...]",
             "", about, "",
             "Keys: defaults < --config FILE (or the --resume run's config.yaml) < --key value. "
             "Values are YAML (1e-3, true, null, [2, 10]); --nowandb means --wandb false.", ""]
    lines += [f"  {name:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {meaning}".rstrip()
              for name, kind, default, meaning in rows]
    if cls.ALIASES:
        lines += ["", "The reference's names, accepted: "
                  + ", ".join(f"{alias} = {key}" for alias, key in cls.ALIASES.items())]
    if cls.UNUSED:
        lines += ["Accepted for the reference's YAMLs and not used: " + ", ".join(cls.UNUSED)]
    return "\n".join(lines)


def parse_config(cls, argv):
    """Build and validate a `cls` config from `--config FILE` and `--key value` flags; `--help`
    prints every key (config_help) and exits."""
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls, os.path.basename(sys.argv[0]) or "script.py"))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    cli = _parse_cli(list(argv), {**fields, **cls.ALIASES})
    values = {}
    resume = cli.get("resume")
    if resume is not None:
        saved = os.path.join(str(resume), CONFIG_FILE)
        if not os.path.exists(saved):
            raise UserError(f"--resume {resume}: no {CONFIG_FILE} there, so it is not a run directory")
        # The run is where it is now: a copied run directory resumes with --resume NEW alone.
        values.update({k: v for k, v in _canonical(cls, _read_yaml(saved), saved).items()
                       if k not in ("save", "resume")})
    if "config" in cli:
        path = cli.pop("config")
        values.update(_canonical(cls, _read_yaml(path), path))
    values.update(_canonical(cls, cli, "the command line"))
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


def prepare_run_dir(config, script_name: str, write_config: bool = True) -> str:
    """The run directory: `--resume DIR` continues DIR; a fresh `--save DIR` must be empty.

    Refuses, touching nothing, to start a fresh run in a directory that already holds one.
    With write_config=False the caller saves the config itself (the trainer's driver does so
    only once a resumed run's checkpoint has been read, so a refused resume changes nothing).
    """
    if config.resume:
        if config.save and os.path.abspath(config.save) != os.path.abspath(config.resume):
            raise UserError(f"--save {config.save} and --resume {config.resume} disagree: give one")
        run_dir = config.resume
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = config.save or os.path.join("runs", script_name, config.exp_name or stamp)
        if os.path.isfile(run_dir):
            raise UserError(f"--save {run_dir} is a file, not a directory")
        if os.path.isdir(run_dir) and set(os.listdir(run_dir)) - {".lock"}:
            raise UserError(f"run directory {run_dir} already holds a run; pass --resume {run_dir} "
                            f"to continue it, or choose another --save")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the run directory {run_dir}: {error.strerror}") from None
    config.save = run_dir
    if write_config:
        save_config(config, run_dir)
    return run_dir
