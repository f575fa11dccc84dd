"""A tiny service for the core test-suite, written with the service kit (docs/service-howto.md).

Run it in a node with ``--extra-service demo=metac.testing.demo``. A Counter is
persistable; a Box holds any persistable capability (possibly from another node,
adopted over the service's own connection), which exercises recursive persistence.
"""

from __future__ import annotations

from typing import Any

from metac import errors
from metac.core.holder import HolderServer
from metac.core.rpc import Servant
from metac.core.service import (
    Description,
    PersistableMixin,
    ServiceContext,
    ServiceDefinition,
    run_service,
)
from metac.schema.load import core, demo


class CounterServer(PersistableMixin, demo.Counter.Server):
    def __init__(self, service: DemoService, name: str) -> None:
        self._ctx, self._name, self._value = service.ctx, name, 0

    async def describe(self, persistent: bool) -> Description:
        return Description("counter", {"name": self._name})

    async def increment(self, by: int, **kwargs: Any) -> int:
        self._value += by
        return self._value

    async def value(self, **kwargs: Any) -> int:
        return self._value

    async def name(self, **kwargs: Any) -> str:
        return self._name


class BoxServer(PersistableMixin, demo.Box.Server):
    def __init__(self, service: DemoService, label: str, cap: Any) -> None:
        self._ctx, self._label, self._cap = service.ctx, label, cap

    async def describe(self, persistent: bool) -> Description:
        return Description("box", {"label": self._label}, caps=[self._cap])

    async def get(self, _context: Any, **kwargs: Any) -> None:
        _context.results.cap = self._cap

    async def label(self, **kwargs: Any) -> str:
        return self._label


class DemoAdminServer(Servant, demo.DemoAdmin.Server):
    def __init__(self, service: DemoService) -> None:
        self._service = service

    async def lease(self, label: str, _context: Any, **kwargs: Any) -> None:
        leases = self._service.state
        leases.append(label)
        _context.results.holder = HolderServer(lambda: leases.remove(label), f"lease {label}")

    async def leases(self, _context: Any, **kwargs: Any) -> None:
        _context.results.labels = list(self._service.state)

    async def makeCounter(self, name: str, _context: Any, **kwargs: Any) -> None:
        if not name:
            raise errors.InvalidArgument("a counter needs a name")
        _context.results.counter = CounterServer(self._service, name)

    async def makeBox(self, label: str, cap: Any, _context: Any, **kwargs: Any) -> None:
        _, held = await self._service.ctx.adopt(cap, core.Persistable)
        _context.results.box = BoxServer(self._service, label, held)


class DemoService(ServiceDefinition):
    name = "demo"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state: list[str] = []  # the labels leased

    def admin(self) -> Any:
        return DemoAdminServer(self)

    async def restore_counter(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return CounterServer(self, str(data["name"]))

    async def restore_box(self, data: dict[str, Any], caps: list[Any]) -> Any:
        if len(caps) != 1:
            raise errors.InvalidArgument("a box holds exactly one capability")
        return BoxServer(self, str(data["label"]), caps[0])


def main() -> None:
    run_service(DemoService)


if __name__ == "__main__":
    main()
