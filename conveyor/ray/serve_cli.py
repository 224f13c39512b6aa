"""``conveyor serve --replicas N``: the Ray Serve application, run from the command line.

Starts a local Ray instance (or joins ``--ray-address``), starts Serve's HTTP proxy on
``--host`` / ``--port``, deploys ``conveyor.ray.build_app`` and waits. SIGTERM or SIGINT:
``serve.shutdown()`` (each replica drains as a single server does on SIGTERM, up to
``--shutdown-timeout``), then the local Ray instance stops; the process exits 0. A second
signal exits at once (status 128 + signal). Joined clusters are left running, minus this
application.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from conveyor.errors import ConveyorError
from conveyor.ray.config import RayConfig

logger = logging.getLogger("conveyor.ray")

APP_NAME = "conveyor"


def run_on_ray(args, engine_kwargs: dict, ray_config: RayConfig) -> int:
    """Serve until a signal; returns the exit status (raises ``ConveyorError`` for a user's
    mistake: Ray missing, a bad option, a replica that cannot start)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConveyorError("--replicas needs Ray Serve: pip install 'conveyor[ray]'") from None
    from conveyor.ray.app import build_app
    from conveyor.server.app import server_config_from_args
    config = server_config_from_args(args)
    app = build_app(engine_kwargs, config, num_replicas=ray_config.replicas,
                    ray_actor_options={"num_cpus": ray_config.replica_num_cpus},
                    autoscaling_config=ray_config.autoscaling_config,
                    request_router=ray_config.request_router)
    stop = _StopLatch()
    local = ray_config.ray_address is None
    if local:
        ray.init(num_cpus=_local_cpus(ray_config), include_dashboard=False,
                 log_to_driver=args.log_level == "debug")
    else:
        ray.init(address=ray_config.ray_address)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        stop.deploying = True
        serve.run(app, name=APP_NAME, route_prefix="/")
        stop.deploying = False
        logger.info("serving on http://%s:%d with %d replica(s) on Ray Serve", config.host,
                    config.port, ray_config.replicas)
        stop.wait()
    except _Interrupted:
        logger.info("stopped while deploying")
    except Exception as exc:  # noqa: BLE001 - Serve's deploy errors, shown as one line
        raise ConveyorError(f"Ray Serve could not deploy conveyor: {_first_line(exc)}") from None
    finally:
        _shut_down(serve, ray, local)
    return 0


class _Interrupted(Exception):
    pass


class _StopLatch:
    """SIGTERM/SIGINT: the first one stops serving (interrupting a deploy in progress), a second
    one exits at once."""

    def __init__(self) -> None:
        self.deploying = False
        self._event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig, frame) -> None:
        if self._event.is_set():
            os._exit(128 + sig)
        self._event.set()
        logger.info("signal %d: shutting Serve down (a second signal exits at once)", sig)
        if self.deploying:
            raise _Interrupted()

    def wait(self) -> None:
        while not self._event.wait(0.5):
            pass


def _shut_down(serve, ray, local: bool) -> None:
    try:
        serve.delete(APP_NAME) if not local else serve.shutdown()
    finally:
        if local:
            ray.shutdown()


def _local_cpus(config: RayConfig) -> int:
    """Logical CPUs of the local Ray instance: the machine's, or enough for every replica."""
    scaling = config.autoscaling_config or {}
    most = max(config.replicas, int(scaling.get("max_replicas", 0)),
               int(scaling.get("initial_replicas", 0)))
    needed = -(-most * config.replica_num_cpus // 1)
    return int(max(os.cpu_count() or 1, needed))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
