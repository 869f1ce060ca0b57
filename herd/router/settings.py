"""Settings an operator may change while the router runs (the dashboard's toggles)."""

from __future__ import annotations

import attrs


@attrs.define
class RuntimeSettings:
    # A model on no node is pulled to the best node, then served.
    auto_pull: bool = True
    # Serve an already-loaded model of the same category instead of cold-loading the one asked.
    vram_fallback: bool = True
    # Strip num_ctx that would reload a loaded model; upgrade to a loaded larger window.
    context_protection: bool = True
    image_generation: bool = True
    transcription: bool = True
    # In-flight requests with no byte relayed for this long are reaped (seconds). Must exceed
    # the first-byte timeout, which covers cold loads.
    stale_timeout: float = 600.0
    # A node:model with this many requests waiting warms the model on the runner-up node.
    prewarm_queue_depth: int = 4
    # How long one node's pre-warm of one model is remembered (no repeat inside it), seconds.
    prewarm_cooldown: float = 120.0
