"""The stream service: TCP and unix endpoints of this node, shared as Stream capabilities.

Serves ``stream.StreamServiceAdmin`` (root: ``tcpEndpoint``, ``unixEndpoint``)
and the ``Stream`` objects it returns (paper 3.1). Every use of such a stream
(``tcpListen``, ``bindTo``) opens a new connection to the endpoint and pipes it
with the pump in ``metac.core.pump``. Endpoint streams and bind holders are
persistable; a persistent bind is re-established when the service starts.

External programs: none. Kernel objects: only sockets and pipes, owned by the
sessions of ``core.streams.StreamHost`` and closed with their holders.
"""
