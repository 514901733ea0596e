"""The `ray up` configs are valid against Ray's own cluster-config schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

CONFIGS = sorted((Path(__file__).parents[2] / "cluster" / "configs").glob("*.yaml"))


def test_there_is_a_cloud_and_an_on_premise_config():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CONFIGS}
    assert {"aws", "local"} <= providers


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    validate_config(config)  # raises jsonschema.ValidationError naming the bad key
    assert any("v2g" in cmd and "serve" in cmd for cmd in config["head_start_ray_commands"])
    assert any("pip install" in cmd for cmd in config["setup_commands"])


def test_a_broken_config_is_refused_by_the_same_check():
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["provider"] = "aws"  # must be a mapping
    with pytest.raises(Exception, match="is not of type 'object'"):
        validate_config(config)
