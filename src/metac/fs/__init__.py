"""The fs service: directories, files and block devices as capabilities (paper 3.2, 3.3, 8.1).

Serves ``fs.FilesystemServiceAdmin`` (root: ``rootNamespace``, block
attachments), ``FilesystemNamespace`` (mount, listMounts), and the exported
``Filesystem``, ``File`` and ``BlockDevice`` objects with their data streams.

Confinement: names are resolved below a directory fd one component at a time
with ``O_NOFOLLOW`` (``resolve``); the data-plane servers run in a bubblewrap
sandbox holding only the exported directory or image (``sandbox``).

External programs (through the supervisor, one per connection or mount):
``diod`` (9P2000.L), ``sftp-server`` (SFTP), ``nbdkit`` (NBD) on the serving
side, each under ``bwrap``; ``sshfs -o passive`` (FUSE), ``nbdfuse``,
``losetup`` and ``mount`` on the mounting side.

Kernel objects: mounts (9p with ``trans=fd``, FUSE, bind, ext4 and the like on
attached devices, read-only tmpfs placeholders), loop devices, NBD devices.
Each is recorded under ``<state>/fs/records`` and swept at the next start if a
crash left it behind.
"""
