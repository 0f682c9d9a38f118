#!/usr/bin/env bash
# Benchmarks drctl against baselines measured in the same run, interleaved, median of N.
#
#   scripts/bench.sh [--scale N] [--runs N] [--random-mb N] [--only logical|physical]
#
# Logical: `pg_dump -Fc -Z0 > /dev/null` (the limit), the runbook's `pg_dump | gzip > file`,
#   and `drctl backup --type logical` into an fs repository.
# Physical: pgBackRest (Debian's, posix repo, zst-3, process-max=2) and pg_basebackup
#   (server-side zstd) against `drctl backup --type physical` and `drctl restore --no-start`;
#   per-segment `wal push` against `pgbackrest archive-push`; WAL replay rate of a PITR restore.
# Peak RSS of every drctl run. The data: a pgbench database (scale 30 by default) plus a table of
# poorly compressible random bytes, so that compression is not flattered.
set -euo pipefail

SCALE=30
RUNS=3
RANDOM_MB=100
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --random-mb) RANDOM_MB="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
export DEBIAN_FRONTEND=noninteractive
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
command -v zstd >/dev/null || apt-get install -y -qq zstd >/dev/null
if [ "$ONLY" != logical ] && ! command -v pgbackrest >/dev/null; then
  apt-get install -y -qq pgbackrest >/dev/null || echo "pgbackrest not installable; skipping it" >&2
fi

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
WORK="$(mktemp -d /tmp/drctl-bench.XXXXXX)"
chmod 755 "$WORK"
cp "$ROOT/target/release/drctl" "$WORK/drctl"
DRCTL="$WORK/drctl"
AS=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$WORK"
  AS=(runuser -u postgres --)
fi
cleanup() {
  for d in "$WORK"/data "$WORK"/replay; do
    [ -d "$d" ] && "${AS[@]}" "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
run() { "${AS[@]}" "$@"; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
run "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust --no-sync >/dev/null
run mkdir -p "$WORK/walsrc" "$WORK/repo"
cat >>"$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
wal_level = replica
archive_mode = on
archive_command = 'cp %p $WORK/walsrc/%f'
CONF
run "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
export PGHOST="$WORK" PGPORT="$PORT" PGUSER=postgres
psql() { run "$PGBIN/psql" -h "$WORK" -p "$PORT" -X -q "$@"; }

echo "preparing data: pgbench scale $SCALE + ${RANDOM_MB} MB of random bytes" >&2
run "$PGBIN/createdb" -h "$WORK" -p "$PORT" bench
run "$PGBIN/pgbench" -h "$WORK" -p "$PORT" -i -q -s "$SCALE" bench >/dev/null 2>&1
ROWS=$((RANDOM_MB * 1024 * 1024 / 256))
psql -d bench -c "CREATE TABLE noise AS SELECT i, decode(string_agg(md5(random()::text || i || j), ''), 'hex') AS b
   FROM generate_series(1, $ROWS) i, generate_series(1, 16) j GROUP BY i" >/dev/null
psql -d bench -c "VACUUM ANALYZE" >/dev/null
psql -d bench -c "CHECKPOINT" >/dev/null
DBSIZE=$(psql -At -d bench -c "SELECT pg_size_pretty(pg_database_size('bench'))")
CLUSTER=$(du -sh "$WORK/data" | cut -f1)

cat >"$WORK/drctl.toml" <<TOML
stanza = "bench"
spool-dir = "$WORK/spool"
[postgres]
host = "$WORK"
port = $PORT
bin-dir = "$PGBIN"
data-dir = "$WORK/data"
[repository]
path = "$WORK/repo"
[compression]
algorithm = "zstd"
level = ${DRCTL_LEVEL:-3}
threads = ${DRCTL_THREADS:-0}
TOML
chmod 644 "$WORK/drctl.toml"
# The same at zstd level 1: on dumps it compresses about as well as 3, for much less CPU.
sed -e 's/^level = .*/level = 1/' "$WORK/drctl.toml" >"$WORK/drctl-l1.toml"
chmod 644 "$WORK/drctl-l1.toml"
psql -c "ALTER SYSTEM SET archive_command = '$DRCTL --config $WORK/drctl.toml wal push %p'" >/dev/null
psql -c "SELECT pg_reload_conf()" >/dev/null

# Runs a command as the cluster owner; prints "seconds peak_rss_kib".
measure() {
  if /usr/bin/time -f "%e %M" -o "$WORK/time.out" "${AS[@]}" "$@" >/dev/null 2>"$WORK/last.err"; then
    tail -1 "$WORK/time.out"
  else
    echo "FAILED: $*" >&2; tail -5 "$WORK/last.err" >&2
    echo "n/a 0"
  fi
}
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "n/a"}'; }
maxof() { tr ' ' '\n' | grep -v '^$' | sort -n | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "n/a" && b != "n/a") printf "%.2fx", a/b; else print "n/a" }'; }

declare -A T RSS
add() { T[$1]+="${2%% *} "; RSS[$1]+="${2##* } "; }

if [ "$ONLY" != physical ]; then
  for i in $(seq "$RUNS"); do
    add raw "$(measure bash -c "$PGBIN/pg_dump -Fc -Z0 -d bench > /dev/null")"
    add gzip "$(measure bash -c "$PGBIN/pg_dump -d bench | gzip > $WORK/dump.sql.gz")"
    add zstd "$(measure bash -c "$PGBIN/pg_dump -Fc -Z0 -d bench | zstd -q -T2 -3 > $WORK/dump.zst")"
    add logical "$(measure "$DRCTL" --config "$WORK/drctl.toml" backup --type logical --database bench --no-row-counts)"
    add logical1 "$(measure "$DRCTL" --config "$WORK/drctl-l1.toml" backup --type logical --database bench --no-row-counts)"
  done
  RAW=$(echo "${T[raw]}" | median); GZ=$(echo "${T[gzip]}" | median); DR=$(echo "${T[logical]}" | median)
  echo
  echo "## logical backup, database bench ($DBSIZE), median of $RUNS, interleaved"
  printf '| %-34s | %8s | %-22s |\n' "method" "seconds" "runs"
  printf '| %-34s | %8s | %-22s |\n' "pg_dump -Fc -Z0 > /dev/null" "$RAW" "${T[raw]}"
  printf '| %-34s | %8s | %-22s |\n' "pg_dump | gzip > file" "$GZ" "${T[gzip]}"
  printf '| %-34s | %8s | %-22s |\n' "pg_dump -Fc -Z0 | zstd -T2 -3" "$(echo "${T[zstd]}" | median)" "${T[zstd]}"
  printf '| %-34s | %8s | %-22s |\n' "drctl backup --type logical" "$DR" "${T[logical]}"
  printf '| %-34s | %8s | %-22s |\n' "drctl backup, zstd level 1" "$(echo "${T[logical1]}" | median)" "${T[logical1]}"
  echo "drctl / raw pg_dump: $(ratio "$DR" "$RAW") (goal <= 1.10); drctl / pg_dump|gzip: $(ratio "$DR" "$GZ") (goal <= 0.65)"
  echo "drctl level 1 / raw pg_dump: $(ratio "$(echo "${T[logical1]}" | median)" "$RAW"); stored sizes (MiB): $("$DRCTL" --config "$WORK/drctl.toml" --json list | python3 -c 'import json,sys; print(" ".join(str(b["stored_size"] >> 20) for b in json.load(sys.stdin) if b["type"] == "logical"))') (level 3 and 1, alternating); pg_dump | zstd -3: $(( $(stat -c %s "$WORK/dump.zst") >> 20 ))"
  echo "drctl logical peak RSS: $(( $(echo "${RSS[logical]} ${RSS[logical1]}" | maxof) / 1024 )) MiB (goal <= 64)"
fi

[ "$ONLY" = logical ] && exit 0

HAVE_PGBR=0
if command -v pgbackrest >/dev/null; then
  HAVE_PGBR=1
  run mkdir -p "$WORK/pgbr" "$WORK/pgbrlog" "$WORK/pgbrlock" "$WORK/pgbrspool"
  cat >"$WORK/pgbackrest.conf" <<CONF
[global]
repo1-path=$WORK/pgbr
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-check=n
log-level-console=error
log-level-file=off
log-path=$WORK/pgbrlog
lock-path=$WORK/pgbrlock
spool-path=$WORK/pgbrspool

[bench]
pg1-path=$WORK/data
pg1-port=$PORT
pg1-socket-path=$WORK
CONF
  chmod 644 "$WORK/pgbackrest.conf"
  PGBR=(pgbackrest --config="$WORK/pgbackrest.conf" --stanza=bench)
  run "${PGBR[@]}" stanza-create >/dev/null || { echo "pgbackrest stanza-create failed" >&2; HAVE_PGBR=0; }
fi

for i in $(seq "$RUNS"); do
  [ $HAVE_PGBR = 1 ] && add pgbr_backup "$(measure "${PGBR[@]}" backup --type=full)"
  add drctl_backup "$(measure "$DRCTL" --config "$WORK/drctl.toml" backup --type physical)"
  run rm -rf "$WORK/bb"
  add basebackup "$(measure "$PGBIN/pg_basebackup" -h "$WORK" -p "$PORT" -D "$WORK/bb" -Ft --compress=server-zstd:3 -X none --no-manifest -c fast)"
done
for i in $(seq "$RUNS"); do
  if [ $HAVE_PGBR = 1 ]; then
    add pgbr_restore "$(measure "${PGBR[@]}" restore --pg1-path="$WORK/r-pgbr")"
    run rm -rf "$WORK/r-pgbr"
  fi
  add drctl_restore "$(measure "$DRCTL" --config "$WORK/drctl.toml" restore --pitr latest --no-start --archive-mode off --target-dir "$WORK/r-drctl")"
  run rm -rf "$WORK/r-drctl"
done
add read_all "$(measure bash -c "tar -cf - -C $WORK data | cat > /dev/null")"

# Per-segment wal push: real segments of this cluster, renamed onto an unused timeline.
NSEG=$(ls "$WORK/walsrc" | grep -E '^[0-9A-F]{24}$' | head -20 | wc -l)
run mkdir -p "$WORK/push-d" "$WORK/push-p"
for f in $(ls "$WORK/walsrc" | grep -E '^[0-9A-F]{24}$' | head -20); do
  run cp "$WORK/walsrc/$f" "$WORK/push-d/000000AA${f:8}"
  run cp "$WORK/walsrc/$f" "$WORK/push-p/000000AB${f:8}"
done
cat "$WORK"/push-d/* > /dev/null
PUSH_D=$(measure bash -c "for f in $WORK/push-d/*; do $DRCTL --config $WORK/drctl.toml wal push \$f || exit 1; done")
PUSH_P="n/a 0"
if [ $HAVE_PGBR = 1 ]; then
  PUSH_P=$(measure bash -c "for f in $WORK/push-p/*; do ${PGBR[*]} archive-push \$f || exit 1; done")
fi
PER_D=$(awk -v t="${PUSH_D%% *}" -v n="$NSEG" 'BEGIN { printf "%.1f", 1000*t/n }')
PER_P=$(awk -v t="${PUSH_P%% *}" -v n="$NSEG" 'BEGIN { if (t == "n/a") print "n/a"; else printf "%.1f", 1000*t/n }')

# Replay rate: WAL written after a backup, replayed by a started PITR restore.
run "$DRCTL" --config "$WORK/drctl.toml" backup --type physical >/dev/null
psql -d bench -c "UPDATE pgbench_accounts SET abalance = abalance + 1" >/dev/null
psql -c "SELECT pg_switch_wal()" >/dev/null
sleep 2
for i in $(seq 100); do
  A=$(psql -At -c "SELECT last_archived_wal >= pg_walfile_name(pg_current_wal_lsn() - 1) FROM pg_stat_archiver")
  [ "$A" = t ] && break; sleep 0.5
done
RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REPLAY_JSON=$(run "$DRCTL" --config "$WORK/drctl.toml" --json restore --pitr latest --archive-mode off --target-dir "$WORK/replay" --target-port "$RPORT" --socket-dir "$WORK")
run "$PGBIN/pg_ctl" -D "$WORK/replay" -m immediate stop >/dev/null 2>&1 || true
REPLAY_S=$(echo "$REPLAY_JSON" | python3 -c 'import json,sys; d=json.load(sys.stdin); print([s["seconds"] for s in d["stages"] if s["name"]=="recover-and-promote"][0])')
SEGS=$(grep -c "restored log file" "$WORK/replay/drctl-restore.log" || true)

med() { echo "${T[$1]:-}" | median; }
echo
echo "## physical, cluster $CLUSTER (database bench $DBSIZE), median of $RUNS, interleaved"
printf '| %-40s | %8s | %-22s | %s |\n' "method" "seconds" "runs" "peak RSS MiB"
row() { printf '| %-40s | %8s | %-22s | %s |\n' "$1" "$(med "$2")" "${T[$2]:-}" "$(( $(echo "${RSS[$2]:-0}" | maxof) / 1024 ))"; }
row "read the data directory (tar > /dev/null)" read_all
[ $HAVE_PGBR = 1 ] && row "pgbackrest backup --type=full" pgbr_backup
row "pg_basebackup server-zstd:3" basebackup
row "drctl backup --type physical" drctl_backup
[ $HAVE_PGBR = 1 ] && row "pgbackrest restore" pgbr_restore
row "drctl restore --pitr latest --no-start" drctl_restore
echo "backup: drctl / pgBackRest $(ratio "$(med drctl_backup)" "$(med pgbr_backup)") (goal <= 0.5); drctl / pg_basebackup $(ratio "$(med drctl_backup)" "$(med basebackup)")"
echo "restore: drctl / pgBackRest $(ratio "$(med drctl_restore)" "$(med pgbr_restore)") (goal <= 0.6)"
echo "wal push: drctl ${PER_D} ms/segment (peak RSS $(( ${PUSH_D##* } / 1024 )) MiB), pgbackrest archive-push ${PER_P} ms/segment, over $NSEG segments; ratio $(ratio "$PER_D" "$PER_P") (goal <= 0.8)"
echo "replay: $SEGS segments restored by wal fetch (with prefetch) and replayed in ${REPLAY_S}s: $(awk -v n="$SEGS" -v s="$REPLAY_S" 'BEGIN { if (s > 0) printf "%.1f", n/s; else print "n/a" }') segments/s"
echo "repository sizes: drctl $(du -sh "$WORK/repo" | cut -f1) ; pgBackRest $(du -sh "$WORK/pgbr" 2>/dev/null | cut -f1)"
