# Type stub of the optional Rust extension (crate native/, see streamproc/pipeline/native.py).
from typing import Any

class NativePlan:
    def __init__(
        self,
        spec: tuple[Any, ...],
        offset: int,
        prefix: bytes,
        bad: Any,
        tf: Any,
        tfi: Any,
        ineffective: Any,
        /,
    ) -> None: ...
    def __call__(self, buf: bytes, /) -> list[bytes]: ...
    def run(self, buf: bytes, /) -> bytes: ...
