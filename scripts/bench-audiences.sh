#!/usr/bin/env bash
# End-to-end figures of `segmentd audiences` on 5,000,000 generated scores across 1,000
# products (with conversions), against the target:
#   audiences over 5M scores / 1,000 products   < 15 s wall
# The plots (one PNG per product) are timed separately; they are opt-in.
# Usage: scripts/bench-audiences.sh  (BIN, DIR, SCORES, PRODUCTS override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/segmentd}
DIR=${DIR:-out/bench-audiences}
SCORES=${SCORES:-5000000}
PRODUCTS=${PRODUCTS:-1000}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
mkdir -p "$DIR"

if [ ! -f "$DIR/scores.csv" ] || [ "$(cat "$DIR/params" 2>/dev/null)" != "$SCORES $PRODUCTS" ]; then
  "$BIN" generate --customers 100 --order-lines 1000 --scores "$SCORES" --products "$PRODUCTS" \
    --visitors 1000000 --seed 42 --out-dir "$DIR" >/dev/null
  echo "$SCORES $PRODUCTS" > "$DIR/params"
fi

measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$DIR/$name.time" "$@" > "$DIR/$name.log" 2>&1 \
    || { cat "$DIR/$name.log" >&2; exit 1; }
  read -r wall rss < "$DIR/$name.time"
  printf "%-28s %8.2f s %8d MiB\n" "$name" "$wall" "$(( rss / 1024 ))"
}

echo "audiences benchmark: $SCORES scores, $PRODUCTS products ($(nproc) cores)"
printf "%-28s %10s %12s\n" command wall "peak RSS"
measure audiences "$BIN" audiences --scores "$DIR/scores.csv" --conversions "$DIR/conversions.csv" \
  --out "$DIR/audiences.csv" --summary "$DIR/summary.csv" --no-progress
grep -E "^(read|products|placed|wrote)" "$DIR/audiences.log" | sed 's/^/    /'
measure "audiences --plots" "$BIN" audiences --scores "$DIR/scores.csv" \
  --out "$DIR/audiences.csv" --summary "$DIR/summary.csv" --plots "$DIR/plots" --no-progress
grep -E "^drew" "$DIR/audiences --plots.log" | sed 's/^/    /'
