"""One clock for the whole service: milliseconds since the epoch, as Synapse stores them."""

import time


def now_ms() -> int:
    return int(time.time() * 1000)
