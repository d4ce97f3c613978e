"""``ctrstream topics``: a deployment's topics, created once, against the embedded broker."""

from __future__ import annotations

import json
import uuid

import pytest

from pipeline.cli import main


@pytest.mark.kafka
def test_topics_creates_the_three_topics_once_with_their_partitions(broker, capsys):
    from kafka import KafkaConsumer

    tag = uuid.uuid4().hex[:8]
    argv = ["topics", "--bootstrap-servers", broker.bootstrap, "--events-topic", f"ev-{tag}",
            "--samples-topic", f"sa-{tag}", "--dlq-topic", f"dlq-{tag}", "--partitions", "3"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(first["created"]) == sorted([f"ev-{tag}", f"sa-{tag}", f"dlq-{tag}"])
    assert main(argv) == 0  # again: nothing to create, existing topics left as they are
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["created"] == []
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        assert len(c.partitions_for_topic(f"ev-{tag}")) == 3 and len(c.partitions_for_topic(f"sa-{tag}")) == 3
        assert len(c.partitions_for_topic(f"dlq-{tag}")) == 1
    finally:
        c.close()


def test_topics_gives_up_on_a_broker_that_does_not_answer(capsys):
    from pipeline.broker import free_port

    assert main(["topics", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--wait", "1"]) == 1
    assert "did not answer within 1s" in capsys.readouterr().err
