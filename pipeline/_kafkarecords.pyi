# kafka-python's records parsed and built in C (pipeline/_kafkarecords.c): see its header for the contract.
from typing import Any

def parse_v2(buffer: bytes | bytearray | memoryview, pos: int, count: int, base_offset: int, timestamp: int,
             ts_is_log_append: bool, ts_type: int, topic: str, partition: int, leader_epoch: int,
             record_type: type, /) -> tuple[list[Any], int, int]: ...
def build_v2(keys: list[bytes | None], values: list[bytes | None], timestamp_ms: int, /) -> bytearray: ...
