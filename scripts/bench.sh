#!/usr/bin/env bash
# Benchmarks drctl against baselines measured in the same run, interleaved, median of N.
#
#   scripts/bench.sh [--scale N] [--runs N] [--random-mb N]
#
# Logical: `pg_dump -Fc -Z0 > /dev/null` (the limit), the runbook's `pg_dump | gzip > file`,
# and `drctl backup --type logical` into an fs repository; prints ratios and drctl's peak RSS.
# The data: a pgbench database (scale 30 by default) plus a table of poorly compressible
# random bytes, so that compression is not flattered.
set -euo pipefail

SCALE=30
RUNS=3
RANDOM_MB=100
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --random-mb) RANDOM_MB="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
command -v /usr/bin/time >/dev/null || apt-get install -y time >/dev/null

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
DRCTL="$ROOT/target/release/drctl"

WORK="$(mktemp -d /tmp/drctl-bench.XXXXXX)"
AS=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$WORK"
  AS=(runuser -u postgres --)
fi
cleanup() {
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${AS[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust --no-sync >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
shared_buffers = 512MB
max_wal_size = 4GB
fsync = off
CONF
"${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
export PGHOST="$WORK" PGPORT="$PORT" PGUSER=postgres

echo "preparing data: pgbench scale $SCALE + ${RANDOM_MB} MB of random bytes" >&2
"${AS[@]}" "$PGBIN/createdb" -h "$WORK" -p "$PORT" bench
"${AS[@]}" "$PGBIN/pgbench" -h "$WORK" -p "$PORT" -i -q -s "$SCALE" bench >/dev/null 2>&1
ROWS=$((RANDOM_MB * 1024 * 1024 / 512))
"${AS[@]}" "$PGBIN/psql" -h "$WORK" -p "$PORT" -q -d bench -c \
  "CREATE TABLE noise AS SELECT i, decode(string_agg(md5(random()::text || i || j), ''), 'hex') || decode(string_agg(md5(random()::text || j || i), ''), 'hex') AS b
   FROM generate_series(1, $ROWS) i, generate_series(1, 8) j GROUP BY i; VACUUM ANALYZE;" >/dev/null
DBSIZE=$("${AS[@]}" "$PGBIN/psql" -h "$WORK" -p "$PORT" -At -d bench -c "SELECT pg_size_pretty(pg_database_size('bench'))")

cat >"$WORK/drctl.toml" <<TOML
stanza = "bench"
[postgres]
host = "$WORK"
port = $PORT
bin-dir = "$PGBIN"
[repository]
path = "$WORK/repo"
[compression]
algorithm = "zstd"
level = ${DRCTL_LEVEL:-3}
threads = ${DRCTL_THREADS:-0}
TOML
chmod 644 "$WORK/drctl.toml"
"${AS[@]}" mkdir -p "$WORK/repo"

# Runs a command, prints "seconds peak_rss_kib".
measure() {
  local out
  out=$( { /usr/bin/time -f "%e %M" "$@" >/dev/null 2>/dev/null; } 2>&1 | tail -1 )
  echo "$out"
}

declare -A T RSS
for name in raw gzip drctl; do T[$name]=""; RSS[$name]=""; done
for i in $(seq "$RUNS"); do
  r=$(measure "${AS[@]}" bash -c "$PGBIN/pg_dump -Fc -Z0 -d bench > /dev/null"); T[raw]+="${r%% *} "
  r=$(measure "${AS[@]}" bash -c "$PGBIN/pg_dump -d bench | gzip > $WORK/dump.sql.gz"); T[gzip]+="${r%% *} "
  r=$(measure "${AS[@]}" "$DRCTL" --config "$WORK/drctl.toml" backup --type logical --database bench --no-row-counts)
  T[drctl]+="${r%% *} "; RSS[drctl]+="${r##* } "
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
RAW=$(echo "${T[raw]}" | median); GZ=$(echo "${T[gzip]}" | median); DR=$(echo "${T[drctl]}" | median)
RSSMAX=$(echo "${RSS[drctl]}" | tr ' ' '\n' | sort -n | tail -1)
STORED=$(du -sb "$WORK/repo" | cut -f1); GZSIZE=$(stat -c %s "$WORK/dump.sql.gz")

echo
echo "logical backup, database bench ($DBSIZE), median of $RUNS, interleaved"
printf '%-36s %8s  %s\n' "method" "seconds" "runs"
printf '%-36s %8s  %s\n' "pg_dump -Fc -Z0 > /dev/null" "$RAW" "${T[raw]}"
printf '%-36s %8s  %s\n' "pg_dump | gzip > file" "$GZ" "${T[gzip]}"
printf '%-36s %8s  %s\n' "drctl backup --type logical" "$DR" "${T[drctl]}"
awk -v d="$DR" -v r="$RAW" -v g="$GZ" 'BEGIN { printf "drctl / raw pg_dump: %.2fx (goal <= 1.10)\ndrctl / pg_dump|gzip: %.2fx (goal <= 0.65)\n", d/r, d/g }'
echo "drctl peak RSS: $((RSSMAX / 1024)) MiB (goal <= 64)"
echo "stored: drctl repo $((STORED / 1048576)) MiB (all runs: $RUNS copies), one gzip dump $((GZSIZE / 1048576)) MiB"
