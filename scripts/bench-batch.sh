#!/usr/bin/env bash
# End-to-end batch figures on a generated shop of 93,565 customers and 1,000,000 order lines
# (plus its returns, support contacts and engagement), against the targets:
#   discover + assign           <= 2 s wall in total, peak RSS of each <= 256 MiB
#   discover --sample-size all  < 120 s wall
#   peak RSS of every command   < 1 GiB
# Usage: scripts/bench-batch.sh  (BIN, DIR, CUSTOMERS, LINES override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/segmentd}
DIR=${DIR:-out/bench}
CUSTOMERS=${CUSTOMERS:-93565}
LINES=${LINES:-1000000}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
mkdir -p "$DIR"

if [ ! -f "$DIR/orders.csv" ] || [ "$(cat "$DIR/params" 2>/dev/null)" != "$CUSTOMERS $LINES" ]; then
  "$BIN" generate --customers "$CUSTOMERS" --order-lines "$LINES" --seed 42 --out-dir "$DIR" >/dev/null
  echo "$CUSTOMERS $LINES" > "$DIR/params"
fi
INPUTS=(--orders "$DIR/orders.csv" --returns "$DIR/returns.csv" --support "$DIR/support.csv"
        --engagement "$DIR/engagement.csv" --no-progress)

declare -A WALL RSS
measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$DIR/$name.time" "$@" > "$DIR/$name.log" 2>&1 || {
    # validate exits 1 on a FAIL verdict; that is a result, not a crash.
    [ "$name" = validate ] || { cat "$DIR/$name.log" >&2; exit 1; }
  }
  read -r WALL[$name] RSS[$name] < "$DIR/$name.time"
  printf "%-22s %8.2f s %8d MiB\n" "$name" "${WALL[$name]}" "$(( RSS[$name] / 1024 ))"
}

echo "batch benchmark: $CUSTOMERS customers, $LINES order lines ($(nproc) cores)"
printf "%-22s %10s %12s\n" command wall "peak RSS"
measure discover "$BIN" discover "${INPUTS[@]}" --out "$DIR/snapshot.json"
measure assign "$BIN" assign "${INPUTS[@]}" --snapshot "$DIR/snapshot.json" --out "$DIR/memberships.csv"
measure validate "$BIN" validate "${INPUTS[@]}" --snapshot "$DIR/snapshot.json"
measure discover_all "$BIN" discover "${INPUTS[@]}" --sample-size all --out "$DIR/snapshot_all.json"

two_stage=$(echo "${WALL[discover]} + ${WALL[assign]}" | bc)
max_rss=0
for n in "${!RSS[@]}"; do (( RSS[$n] > max_rss )) && max_rss=${RSS[$n]}; done
verdict() { if [ "$(echo "$1" | bc)" -eq 1 ]; then echo met; else echo MISSED; fi; }
echo
two_stage_rss=$(( RSS[discover] > RSS[assign] ? RSS[discover] : RSS[assign] ))
echo "discover + assign:           $two_stage s (target <= 2 s: $(verdict "$two_stage <= 2"))"
echo "discover + assign peak RSS:  $(( two_stage_rss / 1024 )) MiB (target <= 256 MiB: $(verdict "$two_stage_rss <= 262144"))"
echo "discover --sample-size all:  ${WALL[discover_all]} s (target < 120 s: $(verdict "${WALL[discover_all]} < 120"))"
echo "peak RSS:                    $(( max_rss / 1024 )) MiB (target < 1024 MiB: $(verdict "$max_rss < 1048576"))"
grep -E "^verdict" "$DIR/validate.log" || true
