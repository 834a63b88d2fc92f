"""Reach the Hugging Face hub quickly or not at all.

The hub clients retry an unreachable host for about 20 seconds before giving up. A two-second
probe of the endpoint decides up front, and when it fails the clients are told to read their
local caches only, so a missing dataset or model fails in seconds with our own message.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlparse

import huggingface_hub.constants as hub_constants

PROBE_SECONDS = 2.0


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """True when the hub endpoint accepts a TCP connection within `timeout` (offline mode: never)."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    reachable = threading.Event()

    def probe():  # in a thread, because a DNS lookup ignores socket timeouts
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            reachable.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return reachable.is_set()


@contextlib.contextmanager
def cache_only_unless_reachable():
    """Yields True when online; otherwise switches the hub clients to their local caches for the block."""
    if hub_reachable():
        yield True
        return
    import datasets.config

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
