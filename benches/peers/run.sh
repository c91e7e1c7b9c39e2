#!/usr/bin/env bash
# segmentd beside a peer: a minimal Quix Streams job (quix_peer.py) over the same events, on
# the same broker, in the same run, in alternating pairs. Prints each pair's rates and the
# ratio segmentd / peer. Not part of `make test` or CI.
#
# Needs:
#   - tansu, a Kafka-protocol broker (cargo install tansu --features dynostore), on PATH or
#     in TANSU; the mock cluster cannot serve the peer (it does not answer DescribeConfigs);
#   - python3 with this directory's requirements.txt (pip install -r requirements.txt);
#   - a release build of segmentd (cargo build --release).
# Usage: benches/peers/run.sh   (CUSTOMERS, LINES, PAIRS, PARTITIONS, PORT override;
#        CHANGELOG=false runs segmentd without its state changelog; AGING_PERIOD sets its
#        aging.period_seconds)
#
# The events replay a year of the shop's history in about a second, and segmentd's aging
# follows the stream clock, not wall time: with the daily default it would assess customers at
# a boundary for nearly every day the clock enters (work that a real clock spreads over a
# year), and the peer has no such work. Like the traffic runs of `segmentd bench`, segmentd
# runs here with a one-year period (the replay crosses one boundary), so the figures compare
# the work per event; AGING_PERIOD=86400 measures the replay with daily aging.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=benches/peers
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/segmentd}
TANSU=${TANSU:-tansu}
CUSTOMERS=${CUSTOMERS:-5000}
LINES=${LINES:-50000}
PAIRS=${PAIRS:-2}
PARTITIONS=${PARTITIONS:-4}
PORT=${PORT:-19092}
CHANGELOG=${CHANGELOG:-true}
AGING_PERIOD=${AGING_PERIOD:-31536000}
BROKERS=127.0.0.1:$PORT
[[ $AGING_PERIOD =~ ^[0-9]+$ ]] || { echo "AGING_PERIOD must be a number of seconds" >&2; exit 2; }
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
command -v "$TANSU" >/dev/null || { echo "tansu not found: cargo install tansu --features dynostore" >&2; exit 2; }
python3 -c "import quixstreams" 2>/dev/null || { echo "pip install -r $HERE/requirements.txt" >&2; exit 2; }

WORK=$(mktemp -d)
TANSU_PID=
cleanup() {
  [ -n "$TANSU_PID" ] && kill "$TANSU_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The shop, its history as keyed events, and a snapshot discovered from it.
"$BIN" generate --customers "$CUSTOMERS" --order-lines "$LINES" --seed 7 --events \
  --out-dir "$WORK/shop" >/dev/null
S=$WORK/shop
"$BIN" discover --orders "$S/orders.csv" --returns "$S/returns.csv" --support "$S/support.csv" \
  --engagement "$S/engagement.csv" --no-progress --out "$WORK/snapshot.json" >/dev/null
EVENTS=$(wc -l < "$S/events.jsonl")

# The broker, in memory.
"$TANSU" broker --storage-engine "memory://tansu/" --listener-url "tcp://127.0.0.1:$PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$PORT" > "$WORK/tansu.log" 2>&1 &
TANSU_PID=$!
for _ in $(seq 100); do
  (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

# Topics with an explicit retention.ms, which the peer reads off the source topic.
python3 - "$BROKERS" "$PARTITIONS" <<'PY'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
brokers, partitions = sys.argv[1], int(sys.argv[2])
admin = AdminClient({"bootstrap.servers": brokers})
topics = [NewTopic(name, partitions, 1, config={"retention.ms": "604800000"})
          for name in ("peer-events", "peer-quix-out", "peer-segmentd-out", "peer-segmentd-dead")]
for name, future in admin.create_topics(topics).items():
    future.result(30)
PY
python3 "$HERE/produce.py" "$BROKERS" peer-events "$S/events.jsonl"

echo "$EVENTS events of $CUSTOMERS customers in $PARTITIONS partitions, $PAIRS pairs ($(nproc) cores; segmentd changelog: $CHANGELOG, aging period: $AGING_PERIOD s)"
for pair in $(seq "$PAIRS"); do
  HTTP=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat > "$WORK/segmentd-$pair.toml" <<TOML
[daemon]
snapshot = "$WORK/snapshot.json"
snapshot_dir = "$WORK/snapshots-$pair"

[http]
listen = "127.0.0.1:$HTTP"

[kafka]
brokers = "$BROKERS"
group_id = "peer-segmentd-$pair"
input_topics = ["peer-events"]
output_topic = "peer-segmentd-out"
dead_letter_topic = "peer-segmentd-dead"
changelog = $CHANGELOG

[store]
path = "$WORK/segmentd-db-$pair"

[aging]
period_seconds = $AGING_PERIOD
TOML
  ours=$(python3 "$HERE/time_segmentd.py" "$BIN" "$WORK/segmentd-$pair.toml" \
    "http://127.0.0.1:$HTTP/metrics" "$EVENTS" "$WORK/segmentd-$pair.log")
  peer=$(python3 "$HERE/quix_peer.py" "$BROKERS" peer-events peer-quix-out "peer-quix-$pair" \
    "$WORK/quix-state-$pair" "$EVENTS" 2>"$WORK/quix-$pair.log" | tail -1)
  a=$(echo "$ours" | sed -E 's/.*= ([0-9]+) events.*/\1/')
  b=$(echo "$peer" | sed -E 's/.*= ([0-9]+) events.*/\1/')
  echo "pair $pair: $ours; $peer; ratio $(echo "scale=2; $a / $b" | bc)"
done
