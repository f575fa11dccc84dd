"""tests/guest/inner runs only inside the QEMU guest (tests/guest/test_kernel_clients.py).

Those tests need a kernel with the 9p and NBD clients, which this host's kernel
lacks; on the host they would only skip, and a skipped test counts as not done.
So they are not even collected unless METAC_GUEST_INNER=1, which the host test
sets for the pytest run it starts in the guest."""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("METAC_GUEST_INNER") == "1" else ["inner"]
