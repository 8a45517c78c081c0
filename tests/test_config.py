"""The typed configuration: values checked once at load, read as attributes after, and its schema in docs/."""

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from prune2edge import UserError, config

ROOT = Path(__file__).resolve().parent.parent


def test_the_documented_schema_is_the_models():
    """docs/config.schema.json is what ``python -m prune2edge.config`` writes from the models (regenerate it so)."""
    out = subprocess.run([sys.executable, "-m", "prune2edge.config"], capture_output=True, text=True, check=True)
    assert json.loads((ROOT / "docs" / "config.schema.json").read_text()) == json.loads(out.stdout)
    pool = json.loads(out.stdout)["$defs"]["Pool"]
    assert pool["additionalProperties"] is False and "sparsity" in pool["properties"]
    assert pool["properties"]["weight_bits"]["maximum"] == 8


def test_every_key_is_documented():
    """docs/usage.md's configuration table names every key of the models (what a key means is said there once;
    the ``train.*`` row names its keys without the prefix)."""
    usage = (ROOT / "docs" / "usage.md").read_text()
    table = usage[usage.index("## Configuration") : usage.index("## Devices")]
    keys = []
    for name, field in config.Config.model_fields.items():
        section = field.annotation
        nested = isinstance(section, type) and issubclass(section, config.Section)
        keys += [f"{name}.{key}" for key in section.model_fields] if nested else [name]
    undocumented = [k for k in keys if f"`{k}`" not in table and not (k.startswith("train.") and f"`{k[6:]}`" in table)]
    assert len(keys) > 80 and undocumented == []


def test_a_loaded_config_is_typed_checked_once_and_read_only():
    cfg = config.load(None, {"pool": {"sparsity": 0.7, "batch_size": 32, "epochs": 3}})
    assert cfg.pool.sparsity == (0.7, 0.7) and cfg.pool.epochs == (3.0, 3.0)  # a range as one number: the pair
    assert cfg.pool.batch_size == [32] and cfg.cluster.k == "auto"
    with pytest.raises(pydantic.ValidationError):
        cfg.pool.size = 3  # phases cannot change what was checked
    assert config.load(None, config.merged(cfg, {"seed": 4})).seed == 4
    assert config.load(None, config.as_dict(cfg)) == cfg  # written and read again: the same config
    assert config.load(None, {"cluster": {"preset": "paper"}, "pool": {"size": 20}}).cluster.k == 20


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pool": {"batch_size": True}}, "config key 'pool.batch_size' must be a positive integer or a list of them"),
        (
            {"pool": {"batch_size": [64, 0]}},
            "config key 'pool.batch_size' must be a positive integer or a list of them",
        ),
        ({"train": {"epochs": True}}, "config key 'train.epochs' must be a number >= 0, got True"),
        ({"train": {"batch_size": "64"}}, "config key 'train.batch_size' must be a positive integer, got '64'"),
        ({"seed": -1}, "config key 'seed' must be an integer >= 0, got -1"),
        ({"data": {"max_train": 1}}, "config key 'data.max_train' must be an integer > 1, got 1"),
        ({"pool": {"shrink": 1.5}}, "config key 'pool.shrink' must lie in [0.0, 1.0], got 1.5"),
        ({"model": {"kwargs": [1]}}, "config key 'model.kwargs' must be a mapping, got [1]"),
        ({"ray": {"address": "head"}}, "config key 'ray.address' must be null (a Ray instance on this machine)"),
        ({"foo": 1}, "unknown config key 'foo'; known keys: seed, device,"),
        ({"vote": 3}, "config key 'vote' must be a mapping, got 3"),
    ],
)
def test_bad_values_get_one_line_errors_that_name_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        config.load(None, overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """The configs in configs/ are valid: a renamed or removed key would otherwise surface only in a long run."""
    cfg = config.load(path)
    assert cfg.model.arch and cfg.pool.size >= 1


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as text; a config file and --set read it as the number a user means."""
    from prune2edge.cli import parse_settings

    path = tmp_path / "c.yaml"
    path.write_text("train: {weight_decay: 1e-4, lr: 5E-2}\n")
    cfg = config.load(path, parse_settings(["pool.weight_decay=2e-5"]))
    assert (cfg.train.weight_decay, cfg.train.lr, cfg.pool.weight_decay) == (1e-4, 5e-2, 2e-5)
    assert config.read_yaml("name: run1e3") == {"name": "run1e3"}  # text stays text
