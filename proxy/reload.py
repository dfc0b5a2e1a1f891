"""Reloading the config file into a running proxy.

SIGHUP (`proxy.server`) and `POST /admin/reload` (`proxy.admin`) both come here, so both
apply a new file the same way: validate it whole, keep the running config if it is invalid,
and name the settings that only a restart changes. It sits below the admin listener and the
server so that each of them can use it without importing the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from proxy import logs, metrics
from proxy.config import ConfigError, describe, load_config
from proxy.flow import Proxy

# Bound to resources opened at start (sockets, the store client, the tracer provider): a
# reload cannot move them.
_RESTART_FIELDS = ("listen", "admin_listen", "tracing")
_RESTART_STORE_FIELDS = ("url", "timeout", "max_records", "max_bytes")


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a reload did: `problems` if refused, else the new route ids and what it kept."""

    applied: bool
    problems: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)


def reload_file(proxy: Proxy, config_path: str, apply: bool = True) -> Reloaded:
    """Re-read the config file; keep the running config if the new one is invalid.

    Routes, defaults, the admin token, the log level and the rest apply at once, without
    dropping a connection. Listen addresses, the store connection and tracing keep their
    running values until a restart; `restart_required` names the ones the file changed. With
    `apply=False` the file is only validated (a worker checks before signalling the others).
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        metrics.CONFIG_RELOADS.labels("rejected").inc()
        logs.event("config reload refused; keeping the running config", logging.ERROR,
                   source=config_path, problems=exc.problems)  # fmt: skip
        return Reloaded(applied=False, problems=exc.problems)
    running = proxy.config
    restart = [name for name in _RESTART_FIELDS if getattr(config, name) != getattr(running, name)]
    restart += [f"store.{name}" for name in _RESTART_STORE_FIELDS
                if getattr(config.store, name) != getattr(running.store, name)]  # fmt: skip
    kept = {name: getattr(running.store, name) for name in _RESTART_STORE_FIELDS}
    effective = replace(config, listen=running.listen, admin_listen=running.admin_listen,
                        tracing=running.tracing, store=replace(config.store, **kept))  # fmt: skip
    routes = [route.id for route in effective.routes]
    if not apply:
        return Reloaded(applied=False, routes=routes, restart_required=restart)
    proxy.reload(effective)
    logs.set_level(effective.log_level)
    metrics.CONFIG_RELOADS.labels("applied").inc()
    if restart:
        logs.event("config reloaded, but these settings only change on a restart",
                   logging.WARNING, restart_required=restart)  # fmt: skip
    logs.event("config reloaded", config=describe(effective))
    return Reloaded(applied=True, routes=routes, restart_required=restart)
