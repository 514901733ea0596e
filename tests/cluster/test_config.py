"""The serve config: one validated file, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config

SHIPPED = Path(__file__).parents[2] / "cluster" / "configs" / "serve.toml"


def test_the_shipped_config_loads_and_builds_its_dispatchers():
    config = load_config(SHIPPED, env={})
    assert config.system.shards["vehicle"] == 4
    [configure] = config.dispatcher_commands()
    assert configure.site_id == "depot-a" and configure.droop == 0.05
    again = load_config(SHIPPED, env={}).dispatcher_commands()[0]
    assert again.command_id == configure.command_id  # same content, same id: idempotent


def test_the_environment_overrides_the_file():
    config = load_config(
        SHIPPED,
        env={
            "V2G__SYSTEM__DATA_DIR": "/mnt/v2g",
            "V2G__SYSTEM__SHARDS__VEHICLE": "8",
            "V2G__TELEMETRY__EXPORTER": "otlp",
            "UNRELATED": "x",
        },
    )
    assert config.system.data_dir == "/mnt/v2g"
    assert config.system.shards == {"vehicle": 8, "charger": 2}
    assert config.telemetry.exporter == "otlp"
    assert config.runtime().data_dir == "/mnt/v2g"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"V2G__SYSTEM__PARTITIONS": "0"}, "system.partitions = 0: Input should be greater"),
        ({"V2G__TELEMETRY__EXPORTER": "carrier-pigeon"}, "telemetry.exporter = 'carrier-pigeon'"),
        ({"V2G__SYSTEM__COLOUR": "blue"}, "system.colour = 'blue': Extra inputs are not permitted"),
        ({"V2G__SYSTEM__NAME__X": "1"}, "does not name a table"),
    ],
)
def test_bad_values_name_the_key_and_the_reason(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(SHIPPED, env=env)


def test_a_bad_site_is_refused_before_anything_starts(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[[sites]]\nsite_id = "x"\ntransformers = []\n')
    with pytest.raises(ConfigError, match=r"sites\[x\].transformers"):
        load_config(path, env={})


def test_a_missing_or_broken_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[system\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, env={})
