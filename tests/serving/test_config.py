"""`lamp serve` settings (defaults < YAML < flags), the Serve app builder and the Serve config file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serving.app import build_app
from serving.cli import build_parser
from serving.config import ServeSettings, load_settings
from serving.serve_command import settings_from_args

REPO = Path(__file__).resolve().parents[2]


def test_yaml_then_flags_override_defaults(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nmax-batch-size: 8\nbatch_wait_ms: '2.5'\nreplicas: 2\n")
    settings = load_settings(config, {"port": 9002, "replicas": None})
    assert (settings.port, settings.max_batch_size, settings.batch_wait_ms, settings.replicas) == (9002, 8, 2.5, 2)
    assert settings.max_queue == ServeSettings().max_queue


@pytest.mark.parametrize("text, message", [
    ("prot: 8000\n", "unknown setting 'prot'"),
    ("port: eighty\n", "port must be an integer"),
    ("port: 70000\n", r"port must be an integer in \[1, 65535\]"),
    ("max_batch_size: 0\n", "max_batch_size must be an integer >= 1"),
    ("prefill_forward_cost_tokens: -1\n", "prefill_forward_cost_tokens must be an integer >= 0"),
    ("dtype: float8\n", "dtype must be one of"),
    ("routing: round-robin\n", "routing must be one of affinity, random"),
    ("- port\n", "must contain a mapping"),
    ("port: [1\n", "not valid YAML"),
])
def test_bad_settings_name_the_key(tmp_path, text, message):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_settings(config, {})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", {})


def test_command_line_resolves_paths_and_keeps_config_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("quantization: none\nmax_queue: 7\n")
    args = build_parser().parse_args(["serve", "--config", "c.yaml", "--store", "st", "--prompts", "",
                                      "--serve-log-level", "debug", "--port", "8123"])
    settings = settings_from_args(args)
    assert settings.store == str(tmp_path / "st")
    assert settings.prompts_dir is None
    assert (settings.quantization, settings.dtype, settings.max_queue, settings.port) == ("none", "auto", 7, 8123)
    assert settings.log_level == "DEBUG"


def test_missing_backbone_path_fails_before_ray_starts(tmp_path):
    args = build_parser().parse_args(["serve", "--backbone", str(tmp_path / "no-model")])
    with pytest.raises(FileNotFoundError, match="no-model does not exist"):
        settings_from_args(args)


def test_settings_round_trip_through_app_args():
    settings = ServeSettings(port=9000, replicas=2, store="/data/s", batch_wait_ms=1.5)
    assert ServeSettings.from_mapping(settings.to_args()) == settings
    assert isinstance(build_app(settings.to_args()), Application)


def test_routing_picks_the_model_deployments_request_router():
    assert settings_from_args(build_parser().parse_args(["serve", "--replicas", "2"])).routing_in_force == "affinity"
    args = build_parser().parse_args(["serve", "--replicas", "2", "--routing", "random"])
    assert settings_from_args(args).routing_in_force == "random"
    for routing, router in (("affinity", "serving.routing.router:TaskAffinityRouter"),
                            ("random", "PowerOfTwoChoicesRequestRouter")):
        app = build_app(ServeSettings(replicas=2, routing=routing).to_args())
        model = app._bound_deployment.init_args[0]
        assert model._bound_deployment.name == "LampModel"
        assert model._bound_deployment._deployment_config.request_router_config.request_router_class.endswith(router)


def test_the_affinity_load_bound_reaches_the_router_and_is_checked():
    args = build_parser().parse_args(["serve", "--replicas", "2", "--affinity-load-factor", "2",
                                      "--affinity-min-queue", "4"])
    app = build_app(settings_from_args(args).to_args())
    config = app._bound_deployment.init_args[0]._bound_deployment._deployment_config.request_router_config
    assert config.request_router_kwargs == {"load_factor": 2.0, "min_queue": 4}
    with pytest.raises(ValueError, match=r"affinity_load_factor must be a number in \[1, 100\], got 0.5"):
        ServeSettings(affinity_load_factor=0.5)
    with pytest.raises(ValueError, match="affinity_min_queue must be an integer >= 1, got 0"):
        ServeSettings(affinity_min_queue=0)


def test_shipped_serve_config_is_valid_for_serve_deploy():
    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app"
    settings = ServeSettings.from_mapping(app.args)
    assert settings.store_dir.is_absolute()
    assert isinstance(build_app(app.args), Application)


def test_fair_preemption_setting_reaches_the_engine_config():
    from serving.config import ServeSettings

    assert ServeSettings().engine_config().fair_preemption is True
    assert ServeSettings(fair_preemption=False).engine_config().fair_preemption is False
    with pytest.raises(ValueError, match="fair_preemption"):
        ServeSettings(fair_preemption="off")
    args = build_parser().parse_args(["serve", "--fair-preemption", "off", "--prompts", ""])
    assert settings_from_args(args).fair_preemption is False
