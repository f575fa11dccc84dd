"""OCI bundle generation (metac.compute.oci): pure, table-driven."""

from __future__ import annotations

import pytest

from metac.compute import oci


def test_container_config_namespaces_mounts_memory() -> None:
    spec = oci.ContainerSpec(
        rootfs="/run/metac/compute/e1/root", init_binary="/usr/bin/catatonit", hostname="e1",
        memory_mib=64,
        mounts=(oci.BindMount("/m/b", "/data/sub"), oci.BindMount("/m/a", "/data", True)))
    cfg = oci.container_config(spec)
    assert cfg["root"] == {"path": "/run/metac/compute/e1/root", "readonly": False}
    assert cfg["hostname"] == "e1"
    types = [ns["type"] for ns in cfg["linux"]["namespaces"]]
    assert sorted(types) == ["ipc", "mount", "network", "pid", "uts"]
    assert "path" not in cfg["linux"]["namespaces"][-1]
    assert cfg["linux"]["resources"]["memory"] == {"limit": 64 * 1024 * 1024}
    assert cfg["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    dests = [m["destination"] for m in cfg["mounts"]]
    # The pause init is bound into the container's private /dev, then parents before children.
    assert dests.index("/dev") < dests.index(oci.INIT_PATH)
    assert dests.index("/data") < dests.index("/data/sub")
    data = next(m for m in cfg["mounts"] if m["destination"] == "/data")
    assert data["source"] == "/m/a" and "ro" in data["options"] and "rbind" in data["options"]
    sub = next(m for m in cfg["mounts"] if m["destination"] == "/data/sub")
    assert "ro" not in sub["options"]
    assert cfg["process"]["args"] == list(oci.INIT_ARGS)
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]
    assert "/proc/sys" in cfg["linux"]["readonlyPaths"]


def test_no_memory_limit_and_existing_netns() -> None:
    cfg = oci.container_config(oci.ContainerSpec(rootfs="/r", init_binary="/i",
                                                 netns="/proc/7/ns/net"))
    assert "memory" not in cfg["linux"]["resources"]
    assert {"type": "network", "path": "/proc/7/ns/net"} in cfg["linux"]["namespaces"]


def test_process_config_user_env_cwd_terminal() -> None:
    spec = oci.ProcessSpec(("sh", "-c", "id"), env=("A=1", "PATH=/x", "A=2"), cwd="/tmp/./w",
                           uid=1000, gid=100, terminal=True, console_size=(30, 120))
    proc = oci.process_config(spec)
    assert proc["user"] == {"uid": 1000, "gid": 100}
    assert proc["cwd"] == "/tmp/w"
    assert proc["env"] == ["PATH=/x", "HOME=/", "TERM=xterm", "A=2"]
    assert proc["terminal"] is True and proc["consoleSize"] == {"height": 30, "width": 120}
    assert proc["noNewPrivileges"] is True
    caps = proc["capabilities"]
    assert caps["ambient"] == [] and "CAP_SYS_ADMIN" not in caps["bounding"]
    assert "CAP_NET_RAW" in caps["effective"]


def test_root_default_env() -> None:
    proc = oci.process_config(oci.ProcessSpec(("true",)))
    assert proc["env"] == [f"PATH={oci.DEFAULT_PATH}", "HOME=/root"]
    assert proc["cwd"] == "/" and proc["terminal"] is False and "consoleSize" not in proc


@pytest.mark.parametrize("kwargs, message", [
    ({"args": ()}, "needs a command"),
    ({"args": ("",)}, "must not be empty"),
    ({"args": ("a\0b",)}, "NUL"),
    ({"args": ("x" * 200_000,)}, "longer than"),
    ({"args": ("true",), "env": ("NOEQUALS",)}, "KEY=VALUE"),
    ({"args": ("true",), "env": ("=v",)}, "KEY=VALUE"),
    ({"args": ("true",), "cwd": "relative"}, "absolute"),
    ({"args": ("true",), "cwd": "/a/../b"}, "'..'"),
    ({"args": ("true",), "uid": -1}, "uid"),
    ({"args": ("true",), "gid": 2**32}, "gid"),
])
def test_process_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(oci.SpecError, match=message):
        oci.ProcessSpec(**kwargs)


@pytest.mark.parametrize("source, dest, message", [
    ("relative", "/x", "source"),
    ("/s", "/", "root filesystem"),
    ("/s", "x", "absolute"),
    ("/s", "/a/../../etc", "'..'"),
])
def test_bind_mount_rejects(source: str, dest: str, message: str) -> None:
    with pytest.raises(oci.SpecError, match=message):
        oci.BindMount(source, dest)


def test_container_spec_rejects_duplicates_and_bad_memory() -> None:
    with pytest.raises(oci.SpecError, match="two filesystems"):
        oci.ContainerSpec(rootfs="/r", init_binary="/i",
                          mounts=(oci.BindMount("/a", "/d"), oci.BindMount("/b", "/d/")))
    with pytest.raises(oci.SpecError, match="memory"):
        oci.ContainerSpec(rootfs="/r", init_binary="/i", memory_mib=-1)


def test_container_path_normalises() -> None:
    assert oci.container_path("//a/./b//") == "/a/b"
    assert oci.container_path("/") == "/"
