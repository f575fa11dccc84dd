"""Pure codecs: text that users and peers hand us, parsed once into frozen values.

Everything in this package is stdlib only and does no I/O (no asyncio, socket, os
calls or capnp), so it can be fuzzed in isolation.

* ``refs``: sturdy references, ``ref://[node]/service/secret`` <-> ``SturdyRef``.
  ``RefError`` is its only error; no message or ``repr`` ever shows a secret.
* ``locators``: CLI resource specifiers (``local:/dir``, ``newlocal:eth9``, ``ref://…``,
  ``tcp:host:port``, ``unix:/path``) <-> frozen ``Locator`` values; ``LocatorError``.
* ``paths``: validation of relative names inside a capability-confined directory;
  ``PathError``.

All three error classes subclass ``ValueError``.
"""
