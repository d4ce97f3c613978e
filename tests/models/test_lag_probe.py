"""The trainer's consumer-lag probe (models/online.py ``_LagProbe``) against the embedded broker."""

from __future__ import annotations

import math
import uuid

import pytest

from models.online import TrainerSettings, _LagProbe
from pipeline.broker import create_topics

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_lag_is_end_minus_consumed_offsets_probed_every_few_steps(broker, client):
    from kafka import KafkaProducer

    topic = f"lag-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: 2})
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
    # one record per batch: the embedded broker's "latest" is exact for those (see _LagProbe)
    for part, n in ((0, 7), (1, 4)):
        for _ in range(n):
            p.send(topic, b"v", partition=part)
            p.flush()
    p.close()
    probe = _LagProbe(TrainerSettings(bootstrap_servers=broker.bootstrap, kafka_client=client))
    try:
        assert math.isnan(probe.last)
        assert probe({(topic, 0): 2, (topic, 1): 4}) == 5.0  # 7 - 2 + 4 - 4
        for _ in range(probe.EVERY - 1):  # between probes the last figure is kept
            assert probe({(topic, 0): 7, (topic, 1): 4}) == 5.0
        assert probe({(topic, 0): 7, (topic, 1): 4}) == 0.0  # the next probe
    finally:
        probe.close()


def test_an_unreachable_broker_leaves_the_lag_unknown_and_training_goes_on():
    from pipeline.broker import free_port

    probe = _LagProbe(TrainerSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", kafka_client="confluent"))
    try:
        assert math.isnan(probe({("samples", 0): 3}))
    finally:
        probe.close()
