"""The demo service, after a burst of ``METAC_TEST_CHATTY_BYTES`` of output on stderr.

Stands for a chatty (or attacked) service in the tests of the log size cap: run
it with ``--extra-service NAME=metac.testing.chatty``. Its last line of noise
is ``chatty: done``.
"""

from __future__ import annotations

import os

from metac.testing.demo import main as demo_main

LINE = b"x" * 1023 + b"\n"


def main() -> None:
    total = int(os.environ.get("METAC_TEST_CHATTY_BYTES", str(1 << 20)))
    for _ in range(total // len(LINE)):
        os.write(2, LINE)
    os.write(2, b"chatty: done\n")
    demo_main()


if __name__ == "__main__":
    main()
