"""Membranes: everything obtained through one sturdy ref, revocable at once.

A service's ``Service.restore`` does not hand out its object itself but a
*proxy* bound to the ref it was restored through (one ``Membrane`` per ref).
A proxy is a server of the same Cap'n Proto interface, built from the schema
(``proxy_class``): each call is forwarded to the real object in this process;
a method whose results hold no capability is a tail call (no copy, no extra
hop); for the others the results are copied and every capability in them is
wrapped in a proxy of the same membrane, so whatever is derived from the ref
(a Stream from ``sftpStream``, the Holder of a ``tcpListen``) is under it too.

``Membrane.revoke`` (persistence tells the service which refs went away) makes
every proxy of the membrane answer ``NotFound`` from then on, drops its
references to the real objects and releases the Holders obtained through it,
which ends the actions they kept alive (a pumped connection, a file server
process).

``createSturdyRef`` called through a proxy makes a *child* of the membrane's
ref: never more persistent than it, linked to it in the store (revoked with
it) and counted against its quota (``adopt`` hook, persistence decides). With
``alias`` (a service adopting a capability a client handed it) the new ref is
the same grant under a temporary name: refs made through it are children of
the grant itself, so adopting does not cap what can be persisted.

A result field's type may be a base of what the object really is (a
``Holder`` field carrying a ``WaitableHolder``), and pycapnp cannot tell the
real type of a capability. A proxy therefore serves the most derived interface
of the protocol that extends the declared one, when those form a single chain
(``Holder`` -> ``WaitableHolder``, ``L2Interface`` -> ``KernelInterface``); a
method the real object lacks answers ``Unsupported``, as it would unproxied.

Limits: a capability that a result types only as ``Persistable`` (no concrete
interface) is passed through unwrapped, as are AnyPointer results; capabilities
that a client passes *in* are not wrapped (they are the client's own).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import capnp

from metac import errors
from metac.core.rpc import Servant
from metac.core.tasks import TaskSet
from metac.schema import load as schemas
from metac.schema.load import core

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 5.0  # a Holder's release() on revocation
REVOKED_MEMORY = 4096  # recently revoked refs remembered (a restore racing its revocation)

Adopt = Callable[[bytes, Any, bool], Awaitable[None]]

_HOLDER_ID = core.Holder.schema.node.id
_PERSISTABLE_ID = core.Persistable.schema.node.id


_WIDEST: dict[int, Any] = {}


def _ancestors(schema: Any) -> set[int]:
    out: set[int] = set()
    for parent in schema.superclasses:
        out.add(parent.node.id)
        out |= _ancestors(parent)
    return out


def _protocol_interfaces() -> list[Any]:
    """Every interface of the schema modules metac loads."""
    found = []
    for module in vars(schemas).values():
        if isinstance(module, ModuleType):
            found += [v.schema for v in vars(module).values()
                      if isinstance(v, capnp.lib.capnp._InterfaceModule)]
    return found


def widest(schema: Any) -> Any:
    """The most derived protocol interface extending ``schema`` if they form one chain,
    else ``schema`` itself."""
    sid = schema.node.id
    cached = _WIDEST.get(sid)
    if cached is not None:
        return cached
    subs = [s for s in _protocol_interfaces() if sid in _ancestors(s)]
    result = schema
    if subs:
        deepest = max(subs, key=lambda s: len(_ancestors(s)))
        chain = _ancestors(deepest) | {deepest.node.id}
        if all(s.node.id in chain for s in subs):
            result = deepest
    _WIDEST[sid] = result
    return result


def _is_holder(schema: Any) -> bool:
    if schema.node.id == _HOLDER_ID:
        return True
    return any(_is_holder(s) for s in schema.superclasses)


def _type_has_caps(schema_field: Any, seen: set[int]) -> bool:
    kind = schema_field.proto.slot.type.which() if schema_field.proto.which() == "slot" else "group"
    if kind in ("interface", "anyPointer"):
        return True
    if kind == "struct":
        return _struct_has_caps(schema_field.schema, seen)
    if kind == "list":
        return _list_has_caps(schema_field.schema, seen)
    if kind == "group":
        return _struct_has_caps(schema_field.schema, seen)
    return False


def _list_has_caps(list_schema: Any, seen: set[int]) -> bool:
    try:
        element = list_schema.elementType
    except capnp.KjException:
        return False  # pycapnp has no schema object for primitive, Text or Data elements
    if isinstance(element, capnp.lib.capnp._InterfaceSchema):
        return True
    if isinstance(element, capnp.lib.capnp._StructSchema):
        return _struct_has_caps(element, seen)
    if isinstance(element, capnp.lib.capnp._ListSchema):
        return _list_has_caps(element, seen)
    return False


def _struct_has_caps(struct_schema: Any, seen: set[int]) -> bool:
    sid = struct_schema.node.id
    if sid in seen:
        return False
    seen.add(sid)
    return any(_type_has_caps(f, seen) for f in struct_schema.fields_list)


def _copy_params(src: Any, dst: Any, names: tuple[str, ...], pointers: frozenset[str]) -> None:
    for name in names:
        if name in pointers and not src._has(name):
            continue
        setattr(dst, name, getattr(src, name))


class Membrane:
    """The proxies handed out through one sturdy ref (``key``: its stored hash)."""

    def __init__(self, key: bytes, persistent: bool, adopt: Adopt, tasks: TaskSet) -> None:
        self.key = key
        self.persistent = persistent
        self.revoked = False
        self._adopt = adopt
        self._tasks = tasks
        self._proxies: weakref.WeakSet[Proxy] = weakref.WeakSet()

    def wrap(self, cap: Any, schema: Any, *, root: bool = False, local: Any = None) -> Any:
        """A proxy of ``cap`` (a client of interface ``schema``) under this membrane.
        The ref's own object (``root``) is always proxied, if need be as a bare
        Persistable: it is never handed out unfenced."""
        if self.revoked:
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        if schema.node.id == _PERSISTABLE_ID and not root:
            return cap  # no concrete interface to serve (see the module's limits)
        served = widest(schema)
        if served is not schema:
            cap = cap.cast_as(served)
        proxy = proxy_class(served)(cap, self)
        if local is not None and served is schema:
            proxy._local = local
        self._proxies.add(proxy)
        return proxy

    def revoke(self) -> int:
        """Cut every proxy; release the Holders obtained through the ref. How many proxies."""
        self.revoked = True
        proxies = list(self._proxies)
        self._proxies = weakref.WeakSet()
        for proxy in proxies:
            target, proxy._target = proxy._target, None
            proxy._local = None
            if target is not None and proxy._holder:
                self._tasks.spawn(_release(target), "release a revoked holder", log_errors=True)
        return len(proxies)

    async def adopt(self, ref: Any, alias: bool) -> None:
        await self._adopt(self.key, ref, alias)


async def _release(holder: Any) -> None:
    try:
        await asyncio.wait_for(holder.release(), RELEASE_TIMEOUT)
    except (TimeoutError, capnp.KjException) as exc:
        log.info("releasing a holder of a revoked ref failed: %s", errors.from_kj(exc))


class Proxy(Servant):
    """Base of the generated proxy classes (see ``proxy_class``)."""

    _holder = False

    def __init__(self, target: Any, membrane: Membrane) -> None:
        self._target: Any = target
        self._membrane = membrane
        # The real object as a Python object, when it is one of this process's servers:
        # a call whose results hold no capability then runs its ``<method>_context``
        # on the proxy's own call context, instead of a second Cap'n Proto dispatch.
        self._local: Any = None

    def _live(self) -> Any:
        target = self._target
        if target is None:
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        return target

    def _wrap_results(self, src: Any, dst: Any, schema: Any) -> None:
        membrane = self._membrane
        for field in schema.fields_list:
            name = field.proto.name
            if field.proto.discriminantValue != 0xFFFF and src.which() != name:
                continue
            kind = field.proto.slot.type.which() if field.proto.which() == "slot" else "group"
            if kind == "interface":
                if src._has(name):
                    setattr(dst, name, membrane.wrap(getattr(src, name), field.schema))
            elif kind == "anyPointer":
                if src._has(name):
                    setattr(dst, name, getattr(src, name))
            elif kind in ("struct", "group") and _struct_has_caps(field.schema, set()):
                if kind == "group" or src._has(name):
                    self._wrap_results(getattr(src, name), dst.init(name), field.schema)
            elif kind == "list" and _list_has_caps(field.schema, set()):
                if src._has(name):
                    self._wrap_list(getattr(src, name), dst, name, field.schema)
            elif kind in ("struct", "list", "text", "data"):
                if src._has(name):
                    setattr(dst, name, getattr(src, name))
            elif kind != "void":
                setattr(dst, name, getattr(src, name))

    def _wrap_list(self, src: Any, dst: Any, name: str, list_schema: Any) -> None:
        element = list_schema.elementType
        out = dst.init(name, len(src))
        if isinstance(element, capnp.lib.capnp._InterfaceSchema):
            for i, cap in enumerate(src):
                out[i] = self._membrane.wrap(cap, element)
        elif isinstance(element, capnp.lib.capnp._StructSchema):
            for i, item in enumerate(src):
                self._wrap_results(item, out[i], element)
        else:
            raise errors.Unsupported("nested lists of capabilities cannot cross a membrane")

    async def createSturdyRef_context(self, context: Any) -> None:
        """A child of the membrane's ref: never more persistent, linked, within its quota."""
        target = self._live()
        params = context.params
        req = target._request("createSturdyRef")
        alias = bool(params.alias)
        if params._has("rgroup"):
            req.rgroup = params.rgroup
        req.persistent = bool(params.persistent) and self._membrane.persistent and not alias
        res = await req.send()
        self._live()  # revoked meanwhile: the new ref goes with it, refuse it too
        await self._membrane.adopt(res.id, alias)
        context.results.id = res.id


def _tail_method(name: str, names: tuple[str, ...],
                 pointers: frozenset[str]) -> Callable[..., Awaitable[None]]:
    async def call(self: Proxy, context: Any) -> None:
        target = self._live()
        local = self._local
        if local is not None:
            in_process = getattr(local, name + "_context", None)
            if in_process is not None:
                await in_process(context)
                return
        req = target._request(name)
        if names:
            _copy_params(context.params, req, names, pointers)
        await context.tail_call(req)

    call.__name__ = name + "_context"
    return call


def _wrapping_method(name: str, names: tuple[str, ...], pointers: frozenset[str],
                     results: Any) -> Callable[..., Awaitable[None]]:
    async def call(self: Proxy, context: Any) -> None:
        req = self._live()._request(name)
        if names:
            _copy_params(context.params, req, names, pointers)
        res = await req.send()
        self._live()  # revoked while the call ran: hand nothing out
        self._wrap_results(res, context.results, results)

    call.__name__ = name + "_context"
    return call


_CLASSES: dict[int, type[Proxy]] = {}


def proxy_class(schema: Any) -> type[Proxy]:
    """The proxy server class of an interface (built once per interface)."""
    cls = _CLASSES.get(schema.node.id)
    if cls is not None:
        return cls
    module = capnp.lib.capnp._InterfaceModule(schema, schema.node.displayName)
    attrs: dict[str, Any] = {"_holder": _is_holder(schema)}
    for name, method in schema.methods_inherited.items():
        if name == "createSturdyRef":
            continue  # Proxy's own
        params = method.param_type
        names = tuple(f.proto.name for f in params.fields_list)
        pointers = frozenset(
            f.proto.name for f in params.fields_list
            if f.proto.which() == "slot"
            and f.proto.slot.type.which() in ("struct", "list", "text", "data", "interface",
                                              "anyPointer"))
        if any(f.proto.discriminantValue != 0xFFFF for f in params.fields_list):
            raise errors.Unsupported(f"{name}: union parameters cannot cross a membrane")
        if _struct_has_caps(method.result_type, set()):
            attrs[name + "_context"] = _wrapping_method(name, names, pointers, method.result_type)
        else:
            attrs[name + "_context"] = _tail_method(name, names, pointers)
    cls = type(f"Proxy[{schema.node.displayName}]", (Proxy, module.Server), attrs)
    _CLASSES[schema.node.id] = cls
    return cls


class Membranes:
    """A service's membranes, by ref key; revocations persistence reports."""

    def __init__(self, adopt: Adopt) -> None:
        self._adopt = adopt
        self._by_key: weakref.WeakValueDictionary[bytes, Membrane] = weakref.WeakValueDictionary()
        self._revoked: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.tasks = TaskSet()

    def wrap(self, key: bytes, persistent: bool, cap: Any, schema: Any, local: Any = None) -> Any:
        """The proxy of a ref's own object (``key``: the ref's stored hash; ``local``: that
        object as a server of this process, if it is one)."""
        if key in self._revoked:
            raise errors.NotFound("no such sturdy ref (unknown or revoked)")
        membrane = self._by_key.get(key)
        if membrane is None:
            membrane = self._by_key[key] = Membrane(key, persistent, self._adopt, self.tasks)
        if schema.node.id == _PERSISTABLE_ID:
            log.warning("a restored object has no concrete interface; it is served as a "
                        "bare Persistable")
        return membrane.wrap(cap, schema, root=True, local=local)

    def revoke(self, keys: list[bytes]) -> int:
        cut = 0
        for key in keys:
            self._revoked[key] = None
            membrane = self._by_key.pop(key, None)
            if membrane is not None:
                cut += membrane.revoke()
        while len(self._revoked) > REVOKED_MEMORY:
            self._revoked.popitem(last=False)
        return cut

    async def aclose(self) -> None:
        await self.tasks.aclose()
