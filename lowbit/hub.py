"""The Hugging Face Hub: a fast reachability check before any Hub download.

Offline, transformers and datasets retry for ~25 s before failing with a generic
connection error; lowbit checks first (5 s at most) and says what to use instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from lowbit.errors import LowbitError

PROBE_TIMEOUT_S = 5.0


def hub_unreachable_reason() -> str | None:
    """None when the Hub answers; otherwise why it cannot be used."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"cannot reach {endpoint.hostname}:{port} ({err})"


def require_hub(what: str, key: str, offline_alternatives: str) -> None:
    reason = hub_unreachable_reason()
    if reason:
        raise LowbitError(
            f"params.yaml: {key}: {what} needs the Hugging Face Hub, but {reason}. "
            f"Offline alternatives: {offline_alternatives}"
        )
