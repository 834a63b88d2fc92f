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


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """True when the URL's host accepts a TCP connection within `timeout`."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ok = threading.Event()

    def probe():  # in a thread, because a DNS lookup ignores socket timeouts
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    ok.wait(timeout)
    return ok.is_set()


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """True when the hub endpoint is reachable (offline mode: never)."""
    return not hub_constants.HF_HUB_OFFLINE and reachable(hub_constants.ENDPOINT, timeout)


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
