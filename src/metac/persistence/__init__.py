"""Persistence service: sturdy refs (paper section 5.3).

Serves ``PersistenceAdmin`` (root) and a ``ServicePersistenceHandler`` per
service. Keeps refs in SQLite (WAL) in the state dir, storing only a SHA-256
of each secret, so a copy of the database restores nothing. Refs held inside
descriptions (recursive persistence) are sealed with the node key kept in a
separate file. Restores objects through each service's registered Restorer,
with backoff while a service is (re)starting. Runs no external programs and
creates no kernel objects.
"""
