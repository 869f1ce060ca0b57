"""Client APIs, sans-IO: request shaping (:mod:`.shaping`), the one chat representation they
share (:mod:`.chat`), and each API's translator: OpenAI (:mod:`.openai_compat`), Anthropic
Messages (:mod:`.anthropic`), OpenAI Responses (:mod:`.responses`); folding a stream into one
answer (:mod:`.assemble`)."""
