"""Service name -> registered capabilities, with waiters. No I/O."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from metac import errors


@dataclass(eq=False)
class Registration:
    name: str
    service: Any
    admin: Any


@dataclass
class _Slot:
    registration: Registration | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Registry:
    """The services this node knows; ``get`` waits a while for a configured one."""

    def __init__(self, configured: list[str], unavailable: dict[str, str] | None = None) -> None:
        self._slots: dict[str, _Slot] = {name: _Slot() for name in configured}
        #: Services this node does not run, and why (a node not running as root).
        self._unavailable = dict(unavailable or {})

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def register(self, name: str, service: Any, admin: Any) -> Registration:
        slot = self._slots.get(name)
        if slot is None:
            # Services started by hand (not by this node) may register too.
            slot = self._slots[name] = _Slot()
        reg = Registration(name, service, admin)
        slot.registration = reg
        slot.changed.set()
        slot.changed = asyncio.Event()
        return reg

    def unregister(self, reg: Registration) -> None:
        slot = self._slots.get(reg.name)
        if slot is not None and slot.registration is reg:
            slot.registration = None

    def unregister_name(self, name: str) -> None:
        slot = self._slots.get(name)
        if slot is not None:
            slot.registration = None

    def is_registered(self, name: str) -> bool:
        slot = self._slots.get(name)
        return slot is not None and slot.registration is not None

    def all_registered(self) -> bool:
        return all(slot.registration is not None for slot in self._slots.values())

    async def get(self, name: str, timeout: float) -> Registration:
        slot = self._slots.get(name)
        if slot is None and name in self._unavailable:
            raise errors.Unavailable(f"service {name!r} does not run on this node: "
                                     f"{self._unavailable[name]}")
        if slot is None:
            raise errors.NotFound(f"no service named {name[:64]!r} on this node")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while slot.registration is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise errors.Unavailable(f"service {name!r} is not running (yet); try again")
            try:
                await asyncio.wait_for(slot.changed.wait(), remaining)
            except TimeoutError:
                pass
        return slot.registration

    async def wait_all(self) -> None:
        # Polling keeps this free of waiter tasks; readiness is a one-off.
        while not self.all_registered():
            await asyncio.sleep(0.05)
