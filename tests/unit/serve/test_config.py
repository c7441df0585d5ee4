"""ServeConfig from builder args (strings or YAML values) and the shipped Serve config file."""

from pathlib import Path

import pytest
import yaml

from serve.app import ServeConfig

ROOT = Path(__file__).resolve().parents[3]


def test_builder_args_are_typed_by_field():
    cfg = ServeConfig.from_args({"run_dir": "r", "port": "9000", "lm_cpus": "0.5", "token": "t"})
    assert (cfg.port, cfg.lm_cpus, cfg.token, cfg.host) == (9000, 0.5, "t", "127.0.0.1")
    assert cfg.url == "http://127.0.0.1:9000"


@pytest.mark.parametrize("args, message", [
    ({"run_dir": "r", "colour": "x"}, r"serve args: unknown keys \['colour'\]"),
    ({"run_dir": "r", "port": "eighty"}, r"serve args: port: input should be a valid integer \(got 'eighty'\)"),
    ({"run_dir": "r", "port": 0}, "port must be in"),
    ({"run_dir": "r", "lm_replicas": 0}, ">= 1"),
    ({"run_dir": "r", "route_prefix": "api"}, "must start with '/'"),
])
def test_bad_args_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.from_args(args)


def test_shipped_serve_config_is_valid_for_serve_and_for_the_builder():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)  # Serve's own validation of the file
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:app"
    ServeConfig.from_args(app.args)
    from serve.deployments import LMServer, ProgramServer

    assert {d.name for d in app.deployments} == {LMServer.name, ProgramServer.name}


def test_the_lm_is_served_with_the_runs_engine_settings(tmp_path):
    import json

    from serve.app import build_app

    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_text(json.dumps({"max_tokens": 64, "max_model_len": 1024, "gpus_per_replica": 1,
                                               "tensor_parallel_size": 2, "engine_kwargs": {"enable_prefix_caching": False}}))
    (root / "program.json").write_text("{}")
    (root / "best.json").write_text(json.dumps({"program": "iris", "base_model": "m", "strategy": "", "score": 1.0,
                                                "models": {"predict": "m"}, "adapters": {}}))

    def lm_options(cfg):
        lm = build_app(cfg)._bound_deployment.init_args[0]._bound_deployment  # the LM deployment bound into it
        return lm.init_args[0], lm._deployment_config, lm.ray_actor_options, lm._replica_config

    replica, _, actor, placement = lm_options(ServeConfig.from_args({"run_dir": str(root)}))
    assert (replica.num_gpus, replica.tensor_parallel_size) == (1, 2)
    assert replica.engine_kwargs == {"enable_prefix_caching": False}
    assert actor["num_gpus"] == 0 and placement.placement_group_bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2
    replica, _, actor, _ = lm_options(ServeConfig.from_args({"run_dir": str(root), "lm_gpus": "0"}))  # told: CPU
    assert (replica.num_gpus, replica.tensor_parallel_size, actor["num_cpus"]) == (0, 1, 1.0)
    program = build_app(ServeConfig.from_args({"run_dir": str(root), "max_queued_requests": "32"}))._bound_deployment
    config = program._deployment_config  # a full queue: Serve's 503 with Retry-After (it sends none by default)
    assert (config.max_queued_requests, config.backpressure_config.status_code,
            config.backpressure_config.retry_after_s) == (32, 503, 5)


def test_serving_beyond_loopback_needs_a_token_or_an_explicit_yes(monkeypatch):
    from serve.app import ServeConfig, check_exposure

    monkeypatch.delenv("TANDEM_SERVE_TOKEN", raising=False)
    check_exposure(ServeConfig(run_dir="r"))  # 127.0.0.1: fine without a token
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without a token"):
        check_exposure(ServeConfig(run_dir="r", host="0.0.0.0"))
    check_exposure(ServeConfig(run_dir="r", host="0.0.0.0", token="t"))
    check_exposure(ServeConfig(run_dir="r", host="0.0.0.0", open_without_token=True))
    monkeypatch.setenv("TANDEM_SERVE_TOKEN", "t")
    check_exposure(ServeConfig(run_dir="r", host="0.0.0.0"))
