"""Produces `customer_id<TAB>json` lines (segmentd generate --events) to a topic, keyed by
customer, and waits for every delivery. Usage: produce.py BROKERS TOPIC FILE"""

import sys

from confluent_kafka import Producer


def main() -> None:
    brokers, topic, path = sys.argv[1:4]
    producer = Producer(
        {"bootstrap.servers": brokers, "linger.ms": 20, "enable.idempotence": False}
    )
    failed = []

    def delivered(err, _msg):
        if err is not None:
            failed.append(err)

    n = 0
    with open(path, "rb") as lines:
        for line in lines:
            key, value = line.rstrip(b"\n").split(b"\t", 1)
            while True:
                try:
                    producer.produce(topic, key=key, value=value, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            n += 1
    producer.flush(60)
    if failed:
        sys.exit(f"{len(failed)} deliveries failed, first: {failed[0]}")
    print(f"produced {n} events to {topic}")


if __name__ == "__main__":
    main()
