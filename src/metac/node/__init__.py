"""The node: the thin bridge between clients and services.

It serves ``NodeAdmin`` on a root-only unix socket and ``Node`` on TCP (port
901) for everybody, starts every service as a separate supervised process,
restarts a service that dies (with backoff), and reports ready once every
service has registered.
"""
