"""Compute service: processes in Linux containers (paper section 7.2, issue 6).

Serves ``ComputeServiceAdmin`` (root: the launcher, ``metac ps``),
``ComputeLauncher``, ``ProcessEnvironment`` and ``Process``
(schema/compute.capnp).

An environment is one OCI container run by ``runc`` or ``crun`` (Debian
packages of the same names; ``METAC_COMPUTE_RUNTIME`` picks one, ``auto``
prefers crun) with new mount, PID, UTS, IPC and network namespaces, a memory
cgroup limit, and ``catatonit -P`` (Debian package ``catatonit``) as its init;
every process, the first one included, is an ``exec`` in it. Its filesystems
are Filesystem capabilities mounted on this node by the fs service under
``<runtime dir>/compute/<env>/``; its networks are interfaces that the net
service creates in the container's network namespace and binds to the given
L2Interface capabilities. Process stdio are Streams (``metac.core.streams``).

External programs: the OCI runtime, ``unshare`` and ``sh`` (crun on a hybrid
cgroup host), ``nsenter`` and ``ip`` (addresses and routes). Kernel objects:
the runtime's containers and cgroups (named ``metac-<env id>``, swept at
start), nothing else directly.
"""
