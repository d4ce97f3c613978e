# The C fast path of the worker's decode (pipeline/_fastdecode.c): see its header for the contract.

def decode_plain(values: list[bytes | None], max_bytes: int, max_id_chars: int, max_action_chars: int, min_ts: int,
                 max_ts: int, /) -> tuple[bytearray, list[str | int], bytes | None, list[str | int], bytes | None,
                                          bytearray, list[str | int | None], bytes | None, bytearray,
                                          list[str | None]] | None: ...

def xxh3_64(data: bytes, /) -> int: ...
