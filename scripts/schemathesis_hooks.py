"""Schemathesis hooks for Keyward's import endpoint: its bodies are JSON Lines and CSV text, which
Schemathesis cannot serialize by itself."""

import schemathesis


@schemathesis.serializer("application/x-ndjson", "text/csv")
def text_body(ctx, value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
