"""Pure routing policies beside the scorer: model categories, context protection, VRAM-aware
fallback, pre-warm. No I/O, no clock: each takes snapshots and returns a decision."""
