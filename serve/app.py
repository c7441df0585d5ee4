"""Building and running the Serve application of a run dir: ``tandem serve``, ``serve run``, Serve YAML.

Knows: ``ServeConfig`` (where to bind — 127.0.0.1 unless told otherwise —, the optional bearer
token, body and batch limits, the LM deployment's autoscaling and resources — by default the GPUs,
tensor parallelism and vLLM ``engine_kwargs`` the run was optimized with), turning it into a
Serve ``Application`` (``build_app``: the LM deployment bound into the program deployment), the
builder ``app`` for ``serve run serve.app:app run_dir=RUN_DIR`` and Serve config YAML
(``import_path: serve.app:app`` + ``args``), and starting/stopping Serve for the CLI (stopping drains
first: new requests 503 + Retry-After, those in flight get ``drain_grace_s`` seconds to finish, 25 by default). The token
comes from the config or ``$TANDEM_SERVE_TOKEN``. Does not know the HTTP routes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import field
from typing import Any

from actors.typed_config import from_mapping, typed_config

TOKEN_ENV = "TANDEM_SERVE_TOKEN"
DRAIN_GRACE_S = 25.0  # default seconds the requests in flight get when the server stops (Kubernetes gives 30)

logger = logging.getLogger(__name__)


@typed_config
class ServeConfig:
    """How to serve one run dir; values typed by field (``actors.typed_config``)."""

    run_dir: str = field(metadata={"help": "a finished run dir (best.json, program.json)"})
    step: str | None = field(default=None, metadata={"help": "serve this step's program (e.g. 02_w), not the winner"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (0.0.0.0 to expose)"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    token: str | None = field(default=None, metadata={"help": f"bearer token (default ${TOKEN_ENV})"})
    app_name: str | None = field(default=None, metadata={
        "help": "Serve application name; default tandem-<run dir's name>, so runs served on one cluster do not "
                "replace each other (each needs its own route_prefix there: Serve's proxy is shared)"})
    route_prefix: str = field(default="/", metadata={"help": "URL prefix of the routes"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "larger request bodies get 413"})
    max_batch: int = field(default=64, metadata={"help": "most inputs in one /v1/predict list"})
    lm_replicas: int = field(default=1, metadata={"help": "LM replicas at start (autoscaling minimum)"})
    lm_max_replicas: int = field(default=1, metadata={"help": "autoscaling maximum"})
    lm_target_ongoing_requests: float = field(default=32.0, metadata={"help": "autoscaling target per LM replica"})
    lm_cpus: float = field(default=1.0, metadata={"help": "CPUs per LM replica"})
    lm_gpus: float | None = field(default=None, metadata={
        "help": "GPUs per LM replica (per tensor-parallel worker); default the run's gpus_per_replica (0 = CPU)"})
    request_timeout_s: float = field(default=300.0, metadata={
        "help": "seconds a request may take; then 504 (a hung LM replica fails its health check and is replaced)"})
    max_queued_requests: int = field(default=256, metadata={
        "help": "requests waiting beyond the 64 in flight; more get 503 + Retry-After (Serve's back-pressure)"})
    allow_programs: tuple[str, ...] = field(default=(), metadata={
        "help": "modules whose programs may be served besides the built-in ones (serving imports and runs the "
                "module best.json names)"})
    open_without_token: bool = field(default=False, metadata={
        "help": "listen beyond loopback without a bearer token (refused otherwise)"})
    drain_grace_s: float = field(default=DRAIN_GRACE_S, metadata={
        "help": "on SIGTERM / Ctrl-C, seconds the requests in flight get to finish before Serve shuts down; keep "
                "it below the platform's own grace (Kubernetes' terminationGracePeriodSeconds, 30 by default)"})

    def __post_init__(self) -> None:
        if self.app_name is None:  # the run's identity, as its pools carry it
            from actors.runtime import run_slug  # ray: imported only once a config is made
            object.__setattr__(self, "app_name", f"tandem-{run_slug(self.run_dir)}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.lm_replicas < 1 or self.lm_max_replicas < 1 or self.max_batch < 1 or self.max_body_bytes < 1:
            raise ValueError("lm_replicas, lm_max_replicas, max_batch and max_body_bytes must be >= 1")
        if self.request_timeout_s <= 0 or self.max_queued_requests < 1:
            raise ValueError("request_timeout_s must be > 0 and max_queued_requests >= 1")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not self.drain_grace_s >= 0:
            raise ValueError(f"drain_grace_s must be >= 0 seconds, got {self.drain_grace_s}")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeConfig":
        """From builder args (strings from ``serve run k=v`` or typed values from YAML), typed by field.

        Raises:
            ValueError: unknown keys (named with the valid ones) or values of the wrong type, one line
                each (``serve args: port: input should be a valid integer (got 'eighty')``).
        """
        return from_mapping(cls, args, "serve args")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"


def build_app(cfg: ServeConfig):
    """The Serve application: the program deployment (ingress) bound to the LM deployment.

    Raises:
        serve.winner.RunDirError: the run dir is not a finished run.
    """
    from actors.inference import device
    from actors.config import ReplicaConfig
    from serve.deployments import LMServer, ProgramServer
    from serve.winner import check_allowed, load_winner

    winner = load_winner(cfg.run_dir, cfg.step)
    check_allowed(winner.program, cfg.allow_programs)
    run = winner.settings
    gpus = cfg.lm_gpus if cfg.lm_gpus is not None else float(run.get("gpus_per_replica", 0))
    replica = ReplicaConfig(model=winner.base_model, max_model_len=winner.max_model_len, num_cpus=cfg.lm_cpus,
                            num_gpus=gpus, max_lora_rank=winner.max_lora_rank,
                            tensor_parallel_size=int(run.get("tensor_parallel_size", 1)) if gpus else 1,
                            engine_kwargs=dict(run.get("engine_kwargs") or {}), hung_after_s=cfg.request_timeout_s)
    placement = {}
    if replica.tensor_parallel_size > 1:  # vLLM's Ray workers take one bundle each, as in the optimizer's pool
        placement = {"placement_group_bundles": device.bundles(replica), "placement_group_strategy": "STRICT_PACK"}
    lm = LMServer.options(
        autoscaling_config={"min_replicas": cfg.lm_replicas, "initial_replicas": cfg.lm_replicas,
                            "max_replicas": max(cfg.lm_replicas, cfg.lm_max_replicas),
                            "target_ongoing_requests": cfg.lm_target_ongoing_requests},
        ray_actor_options=device.actor_resources(replica), **placement,
    ).bind(replica, winner.adapters)
    token = cfg.token or os.environ.get(TOKEN_ENV) or None
    from ray.serve.config import BackpressureConfig
    from serve.api import RETRY_AFTER_S

    full = BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S)  # Serve's own 503 has no Retry-After
    return ProgramServer.options(max_queued_requests=cfg.max_queued_requests, backpressure_config=full).bind(
        lm, str(winner.run_dir), cfg.step, token, cfg.max_body_bytes, cfg.max_batch,
        request_timeout_s=cfg.request_timeout_s)


def app(args: dict):
    """Builder for ``serve run serve.app:app run_dir=RUN_DIR [key=value ...]`` and Serve config YAML.

    ``host``/``port`` here do not bind anything: Serve's own ``http_options`` do (write
    ``host: 127.0.0.1`` there — Serve's YAML default is 0.0.0.0).
    """
    return build_app(ServeConfig.from_args(dict(args)))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(cfg: ServeConfig) -> None:
    """Refuse to listen beyond loopback with no bearer token, unless ``open_without_token`` says so.

    Raises:
        ValueError: naming the host and the two ways out.
    """
    token = cfg.token or os.environ.get(TOKEN_ENV)
    if cfg.host not in LOOPBACK and not token and not cfg.open_without_token:
        raise ValueError(f"refusing to serve on {cfg.host} without a token: anyone who reaches the port could run the "
                         f"program and its LM. Set --token (or ${TOKEN_ENV}), or pass --open-without-token to serve "
                         "openly on purpose")


def start(cfg: ServeConfig):
    """Start Serve bound to ``cfg.host:cfg.port`` and deploy the run; returns the ingress handle.

    Waits until every deployment is running (the LM replica has loaded the model and adapters).
    """
    from ray import serve

    check_exposure(cfg)
    application = build_app(cfg)
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(application, name=cfg.app_name, route_prefix=cfg.route_prefix)


def stop(cfg: ServeConfig, grace_s: float | None = None) -> None:
    """Drain the application, then shut Serve down (what ``tandem serve`` does on SIGTERM / Ctrl-C).

    Draining: the program deployment answers every new request 503 with ``Retry-After`` (not the
    404 of a deleted route) while the requests in flight finish on the still-running LM deployment,
    for at most ``grace_s`` seconds; then Serve is shut down as a whole (apps and proxies together,
    so no window of 404s). A drain that fails (the app already gone) is logged and Serve is shut
    down anyway. The drain call reaches one program replica through the app handle: the program
    deployment runs one replica (its default; the LM deployment is what scales).

    Args:
        cfg: the served config (its ``app_name``).
        grace_s: most seconds the requests in flight get to finish (default ``cfg.drain_grace_s``).
    """
    from ray import serve

    grace_s = cfg.drain_grace_s if grace_s is None else grace_s
    try:
        drained = serve.get_app_handle(cfg.app_name).drain.remote(grace_s).result(timeout_s=grace_s + 30)
        logger.info("drained %s: %d request(s) were in flight, %d left unfinished after the grace of %.0f s",
                    cfg.app_name, drained["in_flight_at_drain"], drained["left"], grace_s)
    except Exception as exc:  # stopping must go on: the app may be gone or broken already
        logger.warning("could not drain %s (%s: %s); shutting Serve down anyway", cfg.app_name,
                       type(exc).__name__, exc)
    serve.shutdown()
