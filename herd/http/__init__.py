"""The HTTP surface and composition root: the ASGI entry for inference (:mod:`.handler`) and
its relays (:mod:`.relay`), the Quart app (:mod:`.app`), media routes (:mod:`.media`), the
dashboard (:mod:`.dashboard`), the nodes' socket (:mod:`.fleet_socket`), the front door
(:mod:`.security`), and :class:`~herd.http.service.Router`, which builds and runs it all. The
only layer that knows all the others."""
