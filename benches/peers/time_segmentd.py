"""Runs `segmentd run --config CONFIG` until it has committed EVENTS input events, timed like
the peer: from the first event counted to the last, read off its /metrics
(`segmentd_events_consumed_total`, counted once a batch is durable). Stops it with SIGTERM.

Usage: time_segmentd.py BIN CONFIG METRICS_URL EVENTS LOG
"""

import signal
import subprocess
import sys
import time
import urllib.request


def consumed(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        if line.startswith("segmentd_events_consumed_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def main() -> None:
    binary, config, url, events, log = sys.argv[1:6]
    expected = int(events)
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [binary, "run", "--config", config], stdout=out, stderr=subprocess.STDOUT
        )
        first = None
        deadline = time.monotonic() + 600
        n = 0
        while time.monotonic() < deadline and daemon.poll() is None:
            n = consumed(url)
            now = time.monotonic()
            if n > 0 and first is None:
                first = now
            if n >= expected:
                break
            time.sleep(0.02)
        last = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
    if n < expected:
        sys.exit(f"segmentd stopped at {n} of {expected} events (exit {code}); see {log}")
    seconds = last - first
    print(f"segmentd: {n} events in {seconds:.2f} s = {n / seconds:.0f} events/s")


if __name__ == "__main__":
    main()
