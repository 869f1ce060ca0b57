"""Sharing one fleet between several routers, through engines operators already run.

:mod:`herd.shared.resp` is herd's Redis-protocol client (Valkey or Redis) over Trio streams.
"""
