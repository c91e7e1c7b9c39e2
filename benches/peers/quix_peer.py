"""A minimal Quix Streams job over segmentd's input events, for a side-by-side benchmark.

Per event it decodes the JSON, read-modify-writes a few per-customer sums in its RocksDB state
and produces one JSON output keyed by customer: far less work than segmentd's 13 axes, so its
rate is an upper bound for such a job written in a stream processor.

Usage: quix_peer.py BROKERS INPUT_TOPIC OUTPUT_TOPIC GROUP STATE_DIR EVENTS
Prints one line: `quix: N events in S s = R events/s`, timed from the first event processed
to the last.
"""

import sys
import time

from quixstreams import Application


def main() -> None:
    brokers, input_topic, output_topic, group, state_dir, events = sys.argv[1:7]
    expected = int(events)
    app = Application(
        broker_address=brokers,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    source = app.topic(input_topic, value_deserializer="json", key_deserializer="str")
    sink = app.topic(output_topic, value_serializer="json", key_serializer="str")
    progress = {"n": 0, "first": None, "last": None}

    def update(event, state):
        sums = state.get("sums") or {
            "events": 0,
            "orders": 0,
            "spent": 0.0,
            "returned": 0.0,
            "contacts": 0,
            "engagements": 0,
        }
        sums["events"] += 1
        kind = event.get("kind")
        if kind == "order":
            sums["orders"] += 1
            sums["spent"] += sum(
                line.get("quantity", 1) * line.get("unit_price", 0.0)
                for line in event.get("lines", [])
            )
        elif kind == "return":
            sums["returned"] += event.get("amount", 0.0)
        elif kind == "support_contact":
            sums["contacts"] += 1
        elif kind == "engagement":
            sums["engagements"] += 1
        state.set("sums", sums)
        now = time.monotonic()
        if progress["first"] is None:
            progress["first"] = now
        progress["last"] = now
        progress["n"] += 1
        if progress["n"] >= expected:
            app.stop()
        return {"customer_id": event.get("customer_id"), **sums}

    app.dataframe(source).apply(update, stateful=True).to_topic(sink)
    app.run()
    n, first, last = progress["n"], progress["first"], progress["last"]
    seconds = (last - first) if first is not None else 0.0
    rate = n / seconds if seconds > 0 else 0.0
    print(f"quix: {n} events in {seconds:.2f} s = {rate:.0f} events/s")


if __name__ == "__main__":
    main()
