"""Tests for medeman.config: defaults, YAML overlays, --set overrides, errors and the rendered YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medeman.config import SCHEMA, ConfigError, default_config, load_config, merge, parse_set, render_yaml, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- defaults


def test_defaults_are_the_schema():
    cfg = load_config()
    assert cfg == default_config()
    assert set(cfg) == set(SCHEMA)
    for section, options in SCHEMA.items():
        assert set(cfg[section]) == set(options), section
        for key, opt in options.items():
            assert cfg[section][key] == opt.default, f"{section}.{key}"
            if opt.choices is not None:
                assert opt.default in opt.choices, f"{section}.{key}: default outside its choices"


def test_default_config_is_a_fresh_copy():
    cfg = default_config()
    cfg["data"]["patch_size"].append(7)
    cfg["ssl"]["ema_momentum"] = 0.5
    assert default_config()["data"]["patch_size"] == SCHEMA["data"]["patch_size"].default
    assert len(SCHEMA["data"]["patch_size"].default) == 3
    assert default_config()["ssl"]["ema_momentum"] == SCHEMA["ssl"]["ema_momentum"].default


# ---------------------------------------------------------------- overlay order


def test_yaml_overlays_then_sets_in_order(tmp_path):
    first = write(tmp_path, "a.yaml", "ssl:\n  ema_momentum: 0.9\n  consistency: kl\nmodel:\n  name: vnet\n")
    second = write(tmp_path, "b.yaml", "ssl:\n  ema_momentum: 0.95\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config([first, second])
    assert cfg["ssl"]["ema_momentum"] == 0.95  # the later file wins
    assert cfg["ssl"]["consistency"] == "kl"  # keys the later file leaves out keep the earlier value
    assert cfg["model"]["name"] == "vnet"
    assert cfg["train"]["lr"] == pytest.approx(1e-4)
    assert cfg["data"] == default_config()["data"]  # untouched sections keep their defaults

    cfg = load_config([second, first])
    assert cfg["ssl"]["ema_momentum"] == 0.9

    cfg = load_config([first, second], sets=["ssl.ema_momentum=0.999", "ssl.ema_momentum=0.98", "model.name=segresnet"])
    assert cfg["ssl"]["ema_momentum"] == 0.98  # --set beats every file, and the last --set wins
    assert cfg["model"]["name"] == "segresnet"
    assert cfg["ssl"]["consistency"] == "kl"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "ssl:\n", "ssl: null\n"])
def test_empty_yaml_changes_nothing(tmp_path, text):
    assert load_config([write(tmp_path, "empty.yaml", text)]) == default_config()


def test_save_config_round_trips(tmp_path):
    cfg = load_config(
        sets=["model.name=basicunet", "data.patch_size=[64, 64, 32]", "ssl.pseudo_label_threshold=0.9", "train.lr=3e-4"]
    )
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    assert load_config([path]) == cfg


# ---------------------------------------------------------------- --set parsing

SET_CASES = [
    ["ssl.ema_momentum=0.999", ("ssl", "ema_momentum", 0.999)],
    ["train.max_steps=100", ("train", "max_steps", 100)],
    ["train.lr=1e-4", ("train", "lr", 1e-4)],  # YAML 1.1 would leave this a string
    ["train.weight_decay=-2.5E-3", ("train", "weight_decay", -2.5e-3)],
    ["train.lr=1.0e-05", ("train", "lr", 1e-5)],
    ["data.patch_size=[64, 64, 32]", ("data", "patch_size", [64, 64, 32])],
    ["data.patch_size=[64,64,32]", ("data", "patch_size", [64, 64, 32])],
    ["data.intensity_window=[-1e3, 1e3]", ("data", "intensity_window", [-1000.0, 1000.0])],
    ["ssl.pseudo_label_threshold=null", ("ssl", "pseudo_label_threshold", None)],
    ["data.spacing=~", ("data", "spacing", None)],
    ["data.strong_cutout=true", ("data", "strong_cutout", True)],
    ["data.strong_cutout=false", ("data", "strong_cutout", False)],
    ["model.name=vnet", ("model", "name", "vnet")],
    ["ssl.consistency=none", ("ssl", "consistency", "none")],  # "none" is a choice, not null
    ["train.precision=bf16-mixed", ("train", "precision", "bf16-mixed")],
    ["train.precision=32", ("train", "precision", 32)],  # validate turns it into "32"
    ["train.strategy=ddp_find_unused_parameters_true", ("train", "strategy", "ddp_find_unused_parameters_true")],
    [" ssl.ema_momentum =0.9", ("ssl", "ema_momentum", 0.9)],
    ["train.strategy=a=b", ("train", "strategy", "a=b")],  # only the first '=' separates
]


@pytest.mark.parametrize("item, expected", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_parse_set(item, expected):
    section, key, value = parse_set(item)
    assert (section, key) == expected[:2]
    assert value == expected[2] and type(value) is type(expected[2])


SET_ERROR_CASES = [
    ["ssl.ema_momentum", "section.key=value"],
    ["ssl.ema=0.9", "unknown config key 'ssl.ema'"],
    ["ema_momentum=0.9", "unknown config key 'ema_momentum'"],
    ["optim.lr=0.1", "unknown config key 'optim.lr'"],
    ["ssl.ema_momentum.x=0.9", "unknown config key"],
]


@pytest.mark.parametrize("item, fragment", SET_ERROR_CASES, ids=[c[0] for c in SET_ERROR_CASES])
def test_parse_set_errors(item, fragment):
    with pytest.raises(ConfigError) as info:
        parse_set(item)
    assert fragment in str(info.value)


def test_set_values_load_as_yaml():
    cfg = load_config(sets=["train.precision=32", "infer.precision=32", "train.lr=1e-4", "ssl.ema_momentum=1e-1"])
    assert cfg["train"]["precision"] == "32" and cfg["infer"]["precision"] == "32"
    assert cfg["train"]["lr"] == pytest.approx(1e-4) and isinstance(cfg["train"]["lr"], float)
    assert cfg["ssl"]["ema_momentum"] == pytest.approx(0.1)


def test_yaml_file_reads_exponent_floats(tmp_path):
    cfg = load_config([write(tmp_path, "lr.yaml", "train:\n  lr: 3e-4\n  weight_decay: 1E-5\n")])
    assert cfg["train"]["lr"] == pytest.approx(3e-4) and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["weight_decay"] == pytest.approx(1e-5)


# ---------------------------------------------------------------- unknown keys and bad values


def _all_keys() -> list[str]:
    return [f"{section}.{key}" for section, options in SCHEMA.items() for key in options]


UNKNOWN_CASES = [
    # id, yaml text, fragment naming the culprit
    ["key", "ssl:\n  ema_decay: 0.9\n", "'ssl.ema_decay'"],
    ["section", "optimizer:\n  lr: 0.1\n", "'optimizer'"],
    ["key-in-wrong-section", "train:\n  ema_momentum: 0.9\n", "'train.ema_momentum'"],
]


@pytest.mark.parametrize("name, text, fragment", UNKNOWN_CASES, ids=[c[0] for c in UNKNOWN_CASES])
def test_unknown_key_lists_valid_keys(tmp_path, name, text, fragment):
    path = write(tmp_path, f"{name}.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config([path])
    message = str(info.value)
    assert fragment in message and str(path) in message
    for key in _all_keys():
        assert key in message, f"{key} missing from the list of valid keys"


def test_unknown_set_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(sets=["ssl.emma_momentum=0.9"])
    assert all(key in str(info.value) for key in _all_keys())


SHAPE_ERROR_CASES = [
    ["list-top", "- ssl\n- data\n", "expected a mapping of sections"],
    ["scalar-section", "ssl: 0.9\n", "section 'ssl' must be a mapping"],
    ["bad-yaml", "ssl: [0.9\n", "not valid YAML"],
]


@pytest.mark.parametrize("name, text, fragment", SHAPE_ERROR_CASES, ids=[c[0] for c in SHAPE_ERROR_CASES])
def test_malformed_yaml(tmp_path, name, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config([write(tmp_path, f"{name}.yaml", text)])
    assert fragment in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])


def test_merge_rejects_unknown_without_touching_defaults():
    cfg = default_config()
    with pytest.raises(ConfigError):
        merge(cfg, {"ssl": {"ema_momentum": 0.5, "nope": 1}})
    assert merge(default_config(), None) == default_config()


CHOICE_CASES = [
    [key, bad]
    for key, bad in [
        ("model.name", "resnet"),
        ("ssl.teacher_norm", "group"),
        ("ssl.method", "mixmatch"),
        ("ssl.consistency", "l1"),
        ("data.modality", "PET"),
        ("data.cache", "redis"),
        ("train.optimizer", "lamb"),
        ("train.lr_schedule", "step"),
        ("train.precision", "64"),
        ("train.accelerator", "tpu"),
        ("infer.precision", "16-mixed"),
    ]
]


@pytest.mark.parametrize("key, bad", CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_bad_choice_names_the_valid_ones(key, bad):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        load_config(sets=[f"{key}={bad}"])
    message = str(info.value)
    assert key in message and bad in message
    assert all(str(choice) in message for choice in SCHEMA[section][name].choices)


VALUE_CASES = [
    ["ssl.ema_momentum=1.5", "ssl.ema_momentum"],
    ["ssl.ema_momentum=-0.1", "ssl.ema_momentum"],
    ["ssl.ema_momentum=high", "ssl.ema_momentum"],
    ["ssl.ema_momentum=true", "ssl.ema_momentum"],
    ["ssl.pseudo_label_threshold=1.5", "ssl.pseudo_label_threshold"],
    ["data.num_classes=1", "data.num_classes"],
    ["data.patch_size=[96, 96]", "data.patch_size"],
    ["data.patch_size=[96, 0, 96]", "data.patch_size"],
    ["data.spacing=[1.0, -1.0, 1.0]", "data.spacing"],
    ["train.max_steps=0", "train.max_steps"],
    ["train.val_every_steps=0", "train.val_every_steps"],
]

# Values of the right type that crashed or misled only later (issue 23): the exact one-line message at load time.
RANGE_CASES = [
    ["train.lr=-1", "train.lr: -1.0 must be a positive learning rate"],
    ["train.lr=0", "train.lr: 0.0 must be a positive learning rate"],
    ["train.weight_decay=-1", "train.weight_decay: -1.0 must be a non-negative number"],
    ["data.batch_size_labeled=0", "data.batch_size_labeled: 0 must be at least 1 patch per step"],
    ["data.batch_size_unlabeled=-2", "data.batch_size_unlabeled: -2 must be at least 1 patch per step"],
    [
        "data.num_workers=-1",
        "data.num_workers: -1 must be 0 (load in the main process) or a number of worker processes",
    ],
    ["infer.overlap=1.0", "infer.overlap: 1.0 must be a fraction in [0, 1) (1 would never move the window)"],
    ["infer.overlap=-0.1", "infer.overlap: -0.1 must be a fraction in [0, 1) (1 would never move the window)"],
    ["infer.sw_batch_size=0", "infer.sw_batch_size: 0 must be at least 1 window per forward pass"],
    ["train.num_threads=0", "train.num_threads: 0 must be null or a positive number of threads"],
    ["data.val_fraction=1", "data.val_fraction: 1.0 must be a fraction in [0, 1)"],
    ["data.flip_prob=1.5", "data.flip_prob: 1.5 must be a probability in [0, 1]"],
    [
        "data.unlabeled_focus_every_fraction=0",
        "data.unlabeled_focus_every_fraction: 0.0 must be a fraction of train.max_steps in (0, 1]",
    ],
    ["data.unlabeled_focus_every_steps=0", "data.unlabeled_focus_every_steps must be a positive integer, got 0"],
    [
        "data.intensity_window=[250, -175]",
        "data.intensity_window: [250, -175] must be a window [low, high] with low < high",
    ],
    [
        "data.strong_contrast=[0, 1.5]",
        "data.strong_contrast: [0, 1.5] must be a gamma range [low, high] with 0 < low <= high",
    ],
    ["model.channels=[16, 0]", "model.channels: [16, 0] must be a list of positive integers (channels per level)"],
    ["model.channels=[]", "model.channels: [] must be a list of positive integers (channels per level)"],
    ["model.dropout=1", "model.dropout: 1.0 must be a probability in [0, 1)"],
    ["ssl.consistency_weight=-1", "ssl.consistency_weight: -1.0 must be a non-negative weight"],
    ["ssl.rampup_steps=-5", "ssl.rampup_steps: -5 must be a non-negative number of steps"],
]


@pytest.mark.parametrize("item, message", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_out_of_range_values_are_one_line_errors_at_load_time(item, message):
    with pytest.raises(ConfigError) as info:
        load_config(sets=[item])
    assert str(info.value) == message


@pytest.mark.parametrize(
    "item",
    [
        "train.lr=1e-6",
        "train.weight_decay=0",
        "infer.overlap=0",
        "infer.overlap=0.99",
        "data.num_workers=0",
        "train.num_threads=null",
        "train.num_threads=3",
        "model.dropout=0.5",
    ],
)
def test_values_at_the_edge_of_their_range_load(item):
    load_config(sets=[item])


@pytest.mark.parametrize("item, fragment", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_bad_values(item, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(sets=[item])
    assert fragment in str(info.value)


# ---------------------------------------------------------------- rendered YAML


def test_render_yaml_round_trips_to_defaults():
    text = render_yaml()
    assert yaml.safe_load(text) == default_config()
    for section, options in SCHEMA.items():
        for opt in options.values():
            assert opt.help in text  # every key carries its meaning as a comment


def test_render_yaml_round_trips_a_changed_config():
    cfg = load_config(
        sets=[
            "model.name=dynunet",
            "data.spacing=null",
            "train.lr=0.0003",
            "data.strong_cutout=true",
            "train.precision=16-mixed",
        ]
    )
    assert yaml.safe_load(render_yaml(cfg)) == cfg


def test_default_yaml_matches_schema():
    path = CONFIGS / "default.yaml"
    if not path.exists():
        pytest.skip("configs/default.yaml does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(raw) == set(SCHEMA)
    for section, options in SCHEMA.items():
        assert set(raw[section]) == set(options), f"configs/default.yaml [{section}] differs from the schema"
    assert load_config([path]) == default_config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    # an ablation overlay is loaded over the ablation's base config, as benchmarks/ssl_ablation.py loads it
    base = [CONFIGS / "ablation.yaml"] if path.name.startswith("ablation_") else []
    if "--config configs/lesion.yaml" in path.read_text():  # a lesion overlay says so in its usage line
        base = [CONFIGS / "lesion.yaml"]
    load_config([*base, path])


# ---------------------------------------------------------------- types (Option.type) and rules between keys

TYPE_ERROR_CASES = [
    # --set item, fragment of the message
    ["train.lr=abc", "train.lr: 'abc' is not a number"],
    ["train.max_steps=ten", "train.max_steps: 'ten' is not an integer"],
    ["train.max_steps=2.5", "train.max_steps: 2.5 is not an integer"],
    ["data.strong_cutout=3", "data.strong_cutout: 3 is not true or false"],
    ["ssl.consistency_weight=true", "ssl.consistency_weight: True is not a number"],
    ["data.patch_size=64", "data.patch_size: 64 is not a list"],
    ["model.name=[unet]", "model.name: ['unet'] is not a string"],
    ["ssl.method=null", "ssl.method: null is not allowed"],
    ["tune.momentum_window=0.1", "tune.momentum_window: 0.1 is not a list"],
]


@pytest.mark.parametrize("item, fragment", TYPE_ERROR_CASES, ids=[c[0] for c in TYPE_ERROR_CASES])
def test_value_of_the_wrong_type_fails_at_load_time_naming_the_key(item, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(sets=[item])
    assert fragment in str(info.value)


def test_wrong_type_in_a_yaml_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: 'fast' is not a number"):
        load_config([write(tmp_path, "lr.yaml", "train:\n  lr: fast\n")])


CONVERSION_CASES = [
    # --set item, (section, key), value and type after loading
    ["train.lr=1", ("train", "lr"), 1.0],
    ["train.max_steps=2e3", ("train", "max_steps"), 2000],
    ["train.precision=32", ("train", "precision"), "32"],
    ["data.spacing=null", ("data", "spacing"), None],
    ["tune.max_steps=200.0", ("tune", "max_steps"), 200],
    ["train.devices=[0, 1]", ("train", "devices"), [0, 1]],
    ["train.devices=auto", ("train", "devices"), "auto"],
]


@pytest.mark.parametrize("item, where, expected", CONVERSION_CASES, ids=[c[0] for c in CONVERSION_CASES])
def test_values_are_converted_to_their_keys_type(item, where, expected):
    value = load_config(sets=[item])[where[0]][where[1]]
    assert value == expected and type(value) is type(expected)


def test_every_key_has_a_type_its_default_satisfies():
    for section, options in SCHEMA.items():
        for key, opt in options.items():
            assert opt.convert(f"{section}.{key}", opt.default) == opt.default, f"{section}.{key}"


CROSS_KEY_CASES = [
    # sets, fragment of the error (None: valid)
    [["model.norm=instance"], "ssl.teacher_norm=eman needs a BatchNorm network"],
    [
        ["model.norm=instance", "ssl.teacher_norm=eman", "ssl.method=supervised_ema"],
        "ssl.teacher_norm=eman needs a BatchNorm network",
    ],
    [["model.norm=instance", "ssl.teacher_norm=ema"], None],  # a weight-EMA teacher needs no BatchNorm
    [["model.norm=instance", "ssl.method=supervised"], None],
    [["tune.momentum_window=[0.01, 2.0]"], "tune.momentum_window"],
    [["tune.heartbeat_interval=10", "tune.grace_period=5"], "must exceed tune.heartbeat_interval"],
    [["tune.heartbeat_interval=null", "tune.grace_period=5"], None],
]


@pytest.mark.parametrize("sets, fragment", CROSS_KEY_CASES, ids=[" ".join(c[0]) for c in CROSS_KEY_CASES])
def test_rules_between_keys_are_checked_at_load_time(sets, fragment):
    if fragment is None:
        load_config(sets=sets)
        return
    with pytest.raises(ConfigError) as info:
        load_config(sets=sets)
    assert fragment in str(info.value)
