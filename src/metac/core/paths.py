"""Where a node keeps things: the runtime dir (sockets, mounts) and the state dir (database)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_RUNTIME_DIR = "/run/metac"
DEFAULT_STATE_DIR = "/var/lib/metac"


def runtime_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("METAC_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR


def state_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("METAC_STATE_DIR") or DEFAULT_STATE_DIR


def admin_socket(runtime: str) -> str:
    """The root-only NodeAdmin socket (paper: /run/metac/*/socket)."""
    return os.path.join(runtime, "socket")


@dataclass(frozen=True)
class ServiceEnv:
    """What the node tells a service process it starts (through the environment)."""

    name: str
    runtime_dir: str
    state_dir: str
    node_address: str
    node_port: int
    node_instance: str

    def to_environ(self) -> dict[str, str]:
        return {
            "METAC_SERVICE_NAME": self.name,
            "METAC_RUNTIME_DIR": self.runtime_dir,
            "METAC_STATE_DIR": self.state_dir,
            "METAC_NODE_ADDRESS": self.node_address,
            "METAC_NODE_PORT": str(self.node_port),
            "METAC_NODE_INSTANCE": self.node_instance,
        }

    @classmethod
    def from_environ(cls, name: str) -> ServiceEnv:
        env = os.environ
        return cls(
            name=env.get("METAC_SERVICE_NAME", name),
            runtime_dir=runtime_dir(),
            state_dir=state_dir(),
            node_address=env.get("METAC_NODE_ADDRESS", "::1"),
            node_port=int(env.get("METAC_NODE_PORT", "901")),
            node_instance=env.get("METAC_NODE_INSTANCE", ""),
        )
