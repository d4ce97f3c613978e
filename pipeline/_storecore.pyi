from collections.abc import Callable

import numpy as np

def append_chunks_many(users: np.ndarray, bounds: np.ndarray, item: np.ndarray, category: np.ndarray,
                       ts: np.ndarray, action: np.ndarray, pos_get: Callable[[bytes], bytes | None],
                       seq_get: Callable[[bytes], bytes | None], chunk_rows: int, cap: int,
                       error: type[Exception], /) -> tuple[list[tuple[bytes, bytes]], list[bytes],
                                                         list[tuple[bytes, bytes]]]: ...
