"""A real distribution root over metac mounts (issue 19): Debian minbase exported by A.

The root comes from ``metac.testing.rootfs_cache`` (built once per machine with
``metac compute rootfs --debootstrap bookworm``, about half a minute to a few
minutes depending on the mirror); each test works on its own copy.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_compute_cli import service_log, snapshot, wait_clean

from metac.testing.rootfs_cache import BUILD_TIMEOUT, private_debian_root

# The first run on a machine builds the cached root inside the test (debootstrap).
pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root"),
              pytest.mark.timeout(BUILD_TIMEOUT + 300)]

PROBE = "metac-probe"
POSTINST = f"""#!/bin/sh
set -e
# Runs inside the container, over the remote root: write, hard-link, fsync, rename.
dir=/usr/share/{PROBE}
echo "postinst $1 $2" > $dir/postinst.tmp
sync $dir/postinst.tmp
mv $dir/postinst.tmp $dir/postinst.txt
rm -f $dir/hardlink.txt
ln $dir/data.txt $dir/hardlink.txt
"""


def build_deb(out_dir: Path, work: Path, version: str) -> Path:
    """A small .deb: a file, a script and an absolute symlink to it, and a postinst."""
    pkg = work / f"pkg-{version}"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "share" / PROBE).mkdir(parents=True)
    (pkg / "usr" / "bin").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {PROBE}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: metac tests <tests@example.invalid>\n"
        "Description: installed by the metac test suite over a remote root\n")
    (pkg / "DEBIAN" / "postinst").write_text(POSTINST)
    (pkg / "DEBIAN" / "postinst").chmod(0o755)
    (pkg / "usr" / "share" / PROBE / "data.txt").write_text(f"probe data {version}\n")
    script = pkg / "usr" / "bin" / PROBE
    script.write_text(f"#!/bin/bash\necho \"probe {version} runs as $0\"\n")
    script.chmod(0o755)
    (pkg / "usr" / "bin" / f"{PROBE}-link").symlink_to(f"/usr/bin/{PROBE}")
    deb = out_dir / f"{PROBE}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
                   check=True, capture_output=True, timeout=120)
    return deb


def test_debian_root_from_a_data_from_b_run_on_c(nodes_factory, tmp_path: Path) -> None:
    a, b, c = nodes_factory(3)
    root = private_debian_root(tmp_path / "a-debian")
    data = tmp_path / "b-data"
    data.mkdir()
    build_deb(data, tmp_path, "1.0")
    build_deb(data, tmp_path, "1.1")
    for node in (a, b, c):
        node.track_mount_root(tmp_path)

    # dpkg chowns what it unpacks to root and system users: the root's export keeps
    # owners (a squashed export would refuse those chowns).
    root_ref = a.metac("fs", "export", "--preserve-owners", f"local:{root}").stdout.strip()
    data_ref = b.metac("fs", "export", f"local:{data}").stdout.strip()
    launcher = c.metac("compute", "export").stdout.strip()
    before = snapshot(a, b, c)

    script = f"""set -e
echo "bash $BASH_VERSION"
echo "packages $(dpkg -l | grep -c '^ii')"
apt-get --version | head -n 1
if command -v python3 >/dev/null; then python3 -c 'print("python3 ok")'; \
else echo "python3 absent"; fi
echo "interp $(readlink /lib64/ld-linux-x86-64.so.2)"
dpkg -i /data/{PROBE}_1.0_all.deb >/dev/null
dpkg -i /data/{PROBE}_1.1_all.deb >/dev/null
{PROBE}-link
dpkg-query -W -f='${{Package}} ${{Version}} ${{Status}}\\n' {PROBE}
cat /usr/share/{PROBE}/postinst.txt
"""
    proc = b.metac("run", "--on", launcher, "--mount", f"/={root_ref}",
                   "--mount", f"/data={data_ref}", "--", "bash", "-c", script,
                   check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr + service_log(c)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bash 5."), lines
    assert int(lines[1].split()[1]) > 50, lines  # minbase has ~90 packages
    assert lines[2].startswith("apt "), lines
    has_python = (root / "usr" / "bin" / "python3").exists()
    assert lines[3] == ("python3 ok" if has_python else "python3 absent"), lines
    assert lines[4] == "interp /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", lines
    assert lines[5] == f"probe 1.1 runs as /usr/bin/{PROBE}-link", lines
    assert lines[6] == f"{PROBE} 1.1 install ok installed", lines
    assert lines[7] == "postinst configure 1.0", lines

    # What the package installed is on A, as dpkg and the postinst left it.
    share = root / "usr" / "share" / PROBE
    assert (share / "data.txt").read_text() == "probe data 1.1\n"
    assert (share / "postinst.txt").read_text() == "postinst configure 1.0\n"
    assert os.stat(share / "hardlink.txt").st_ino == os.stat(share / "data.txt").st_ino
    assert os.readlink(root / "usr" / "bin" / f"{PROBE}-link") == f"/usr/bin/{PROBE}"
    st = os.stat(root / "usr" / "bin" / PROBE)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
    status = (root / "var" / "lib" / "dpkg" / "status").read_text()
    assert f"Package: {PROBE}\nStatus: install ok installed" in status
    assert not list((root / "var" / "lib" / "dpkg").glob("*.dpkg-*")), "dpkg left temp files"
    wait_clean([a, b, c], before)
