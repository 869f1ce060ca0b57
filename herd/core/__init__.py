"""The pure core: values, wire schemas, errors, scoring, policies (placement, context
protection, substitution, virtual model names, deadlines), request shaping and every API
translator, views, health checks and recommendations.

Rules: nothing here does I/O or reads a clock; nothing here imports trio, httpx, quart or
hypercorn, or any herd module outside ``herd.core`` (``tests/test_layers.py`` checks the
imports). Everything else in herd imports *this*, never the other way.
"""
