"""Type stub of the compiled twin of engine.esl.protocol's framer (engine/esl/_speedups.c)."""

from collections.abc import Callable, Mapping

from engine.esl.protocol import Frame

class EslParser:
    def __init__(self, max_header_bytes: int = ..., max_body_bytes: int = ...) -> None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def _scan(self) -> int: ...
    def feed(self, data: bytes) -> list[Frame]: ...

def decode_value(raw: str) -> str: ...
def setup(
    frame_factory: Callable[[Mapping[str, str], bytes, str], Frame],
    protocol_error: type[Exception],
    bad_line: Callable[[str], Exception],
    content_length: Callable[[str, int], int],
    decode_value: Callable[[str], str],
) -> None: ...
