"""A tiny service for the core test-suite: counters and boxes holding capabilities.

Run it in a node with ``--extra-service demo=metac.testing.demo``. A Counter is
persistable; a Box holds any persistable capability (possibly from another
node), which exercises recursive persistence.
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
    def __init__(self, ctx: ServiceContext, name: str, value: int = 0) -> None:
        self._ctx = ctx
        self._name = name
        self._value = value

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
    def __init__(self, ctx: ServiceContext, label: str, cap: Any) -> None:
        self._ctx = ctx
        self._label = label
        self._cap = cap

    async def describe(self, persistent: bool) -> Description:
        return Description("box", {"label": self._label}, caps=[self._cap])

    async def get(self, _context: Any, **kwargs: Any) -> None:
        _context.results.cap = self._cap

    async def label(self, **kwargs: Any) -> str:
        return self._label


class DemoAdminServer(Servant, demo.DemoAdmin.Server):
    def __init__(self, ctx: ServiceContext, leases: list[str]) -> None:
        self._ctx = ctx
        self._leases = leases

    async def lease(self, label: str, _context: Any, **kwargs: Any) -> None:
        leases = self._leases
        leases.append(label)
        _context.results.holder = HolderServer(lambda: leases.remove(label), f"lease {label}")

    async def leases(self, _context: Any, **kwargs: Any) -> None:
        _context.results.labels = list(self._leases)

    async def makeCounter(self, name: str, _context: Any, **kwargs: Any) -> None:
        if not name:
            raise errors.InvalidArgument("a counter needs a name")
        _context.results.counter = CounterServer(self._ctx, name)

    async def makeBox(self, label: str, cap: Any, _context: Any, **kwargs: Any) -> None:
        _, held = await self._ctx.adopt(cap, core.Persistable)
        _context.results.box = BoxServer(self._ctx, label, held)


class DemoService(ServiceDefinition):
    name = "demo"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.leases: list[str] = []

    async def restore_counter(self, data: dict[str, Any], caps: list[Any]) -> Any:
        return CounterServer(self.ctx, str(data["name"]))

    async def restore_box(self, data: dict[str, Any], caps: list[Any]) -> Any:
        if len(caps) != 1:
            raise errors.InvalidArgument("a box holds exactly one capability")
        return BoxServer(self.ctx, str(data["label"]), caps[0])

    def admin(self) -> Any:
        return DemoAdminServer(self.ctx, self.leases)


def main() -> None:
    run_service(DemoService)


if __name__ == "__main__":
    main()
