#!/usr/bin/env bash
# make bench-pooler: sluice-pooler side by side with PgBouncer (the reference: 1.25 from
# ../shared/anchors or PGBOUNCER=, else Debian's 1.18; Debian's as a second column when
# 1.25 is the reference) and PostgreSQL itself (the ceiling), and the static musl build
# of the pooler next to the glibc one, in one run on one machine, interleaved and
# repeated; prints medians and Sluice/PgBouncer ratios, CPU per transaction first.
#
# Usage: e2e/bench/pooler.sh [REPORT.md]
# Env:   ROUNDS (3)  DURATION seconds per pgbench run (6)  IDLE_CLIENTS (10000)
#        SLUICE_POOLER (path to a release sluice-pooler; built if unset)
#        SLUICE_POOLER_MUSL (the static musl build, as in the image; its rows are left
#        out when unset or missing)
#        PGBOUNCER (the reference PgBouncer; default ../shared/anchors/pgbouncer-1.25.2)
#        SLUICE_BENCH_HTTP (the HTTP load generator; next to SLUICE_POOLER if unset)
#        HTTP_CLIENTS ("10 100": the front door's rows; "" skips them)
#        BENCH_TARGETS ("postgres pgbouncer sluice"; fewer for a quick check)
#        BENCH_SCENARIOS (all; e.g. "c10 c100" for a quick check; IDLE_CLIENTS=0 skips idle)
#        INSTRUCTIONS (1; 0 skips the cachegrind instruction counts)
#        SLUICE_WORKER_THREADS (1: one core, like single-threaded PgBouncer; pgbench and
#        PostgreSQL share the machine. Unset it in a pod: the pooler sizes to its CPU limit.)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
export SLUICE_WORKER_THREADS=${SLUICE_WORKER_THREADS:-1}
POOL=20
REPORT=${1:-}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}
PGBIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
USER_NAME=app PASSWORD=app-secret DB=app

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v pgbouncer >/dev/null; then
  log "installing pgbouncer (Debian package; also brings the libraries 1.25 needs)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
DEBIAN_BOUNCER=$(command -v pgbouncer)
REF_BOUNCER=${PGBOUNCER:-$(cd "$ROOT/.." && pwd)/shared/anchors/pgbouncer-1.25.2}
[[ -x $REF_BOUNCER ]] && "$REF_BOUNCER" --version >/dev/null 2>&1 || REF_BOUNCER=$DEBIAN_BOUNCER
REF_VERSION=$("$REF_BOUNCER" --version | head -1 | awk '{print $2}')
DEB_VERSION=$("$DEBIAN_BOUNCER" --version | head -1 | awk '{print $2}')
# Protocol-level prepared statements in transaction mode came with 1.21.
bouncer_prepares() { awk -v v="$1" 'BEGIN{ split(v, a, "."); exit !(a[1] > 1 || a[2] >= 21) }'; }
if [[ -z ${SLUICE_POOLER:-} && " ${BENCH_TARGETS:-sluice} " == *" sluice "* ]]; then
  log "building sluice-pooler (release)"
  # `make bench-build`, so this and `make bench-operator` share one build
  make -s -C "$ROOT" bench-build
  SLUICE_POOLER=$CARGO_TARGET_DIR/release/sluice-pooler
fi

SLUICE_BENCH_HTTP=${SLUICE_BENCH_HTTP:-$(dirname "${SLUICE_POOLER:-$CARGO_TARGET_DIR/release/sluice-pooler}")/sluice-bench-http}
read -r -a HTTP_CLIENTS <<<"${HTTP_CLIENTS-10 100}"

ulimit -n "$(ulimit -Hn)" || true
(( $(ulimit -n) >= IDLE_CLIENTS + 1000 )) || log "fd limit $(ulimit -n) is below $IDLE_CLIENTS idle clients; that test will hold fewer"
W=$(mktemp -d /tmp/sluice-bench.XXXXXX)
chmod 755 "$W"
# PostgreSQL and PgBouncer refuse to run as root; they run as nobody and write here.
[[ $(id -u) == 0 ]] && chown nobody "$W"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  # servers restarted inside $(...) are not in PIDS: find them by their config path
  pkill -9 -f "$W/" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# setpriv execs in place, so $! is the server's own PID (for /proc CPU and RSS).
# An argv prefix, not a function: a backgrounded function is a subshell whose PID is not the server's.
AS_NOBODY=(); [[ $(id -u) == 0 ]] && AS_NOBODY=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; log "port $1 never opened"; return 1; }

# --- PostgreSQL --------------------------------------------------------------
PG_PORT=$(free_port)
mkdir -p "$W/pg" && chown nobody "$W/pg" 2>/dev/null || true
echo postgres-secret > "$W/pwfile" && chown nobody "$W/pwfile" 2>/dev/null || true
"${AS_NOBODY[@]}" "$PGBIN/initdb" -D "$W/pg/data" -U postgres --auth=scram-sha-256 --pwfile="$W/pwfile" --no-sync --locale=C >/dev/null
"${AS_NOBODY[@]}" "$PGBIN/postgres" -D "$W/pg/data" -p "$PG_PORT" -c listen_addresses=127.0.0.1 \
  -c max_connections=700 -c shared_buffers=256MB -c unix_socket_directories="$W/pg" \
  -c fsync=off -c synchronous_commit=off >"$W/pg.log" 2>&1 &
PIDS+=($!)
wait_port "$PG_PORT"
export PGPASSWORD=postgres-secret
for _ in $(seq 100); do psql -qAtX -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 'select 1' postgres >/dev/null 2>&1 && break; sleep 0.1; done
psql -qAtX -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASSWORD'" postgres
psql -qAtX -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE DATABASE $DB OWNER $USER_NAME" postgres
export PGPASSWORD=$PASSWORD
log "pgbench -i -s 10"
pgbench -q -i -s 10 -h 127.0.0.1 -p "$PG_PORT" -U "$USER_NAME" "$DB" >/dev/null 2>&1

# --- PgBouncer (transaction mode, pool 20, SCRAM to clients) ----------------
# The same prepared-statement cache size as Sluice's max_prepared_statements default.
PREPARED=100
printf '"%s" "%s"\n' "$USER_NAME" "$PASSWORD" > "$W/userlist.txt"
# bouncer_ini NAME PORT VERSION: the config of one PgBouncer.
bouncer_ini() {
  cat > "$W/$1.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=$PG_PORT dbname=$DB
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $W/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_db_connections = $POOL
max_client_conn = $((IDLE_CLIENTS + 1000))
logfile = $W/$1.log
log_connections = 0
log_disconnections = 0
EOF
  bouncer_prepares "$3" && echo "max_prepared_statements = $PREPARED" >> "$W/$1.ini"
  chown nobody "$W/$1.ini" 2>/dev/null || true
}
BOUNCER_PORT=$(free_port); bouncer_ini pgbouncer "$BOUNCER_PORT" "$REF_VERSION"
DEB_PORT=$(free_port); bouncer_ini pgbouncer118 "$DEB_PORT" "$DEB_VERSION"
chown nobody "$W"/userlist.txt 2>/dev/null || true

start_pgbouncer() {
  "${AS_NOBODY[@]}" "$REF_BOUNCER" "$W/pgbouncer.ini" >/dev/null 2>&1 &
  BOUNCER_PID=$!; PIDS+=("$BOUNCER_PID"); wait_port "$BOUNCER_PORT"
}
start_pgbouncer118() {
  "${AS_NOBODY[@]}" "$DEBIAN_BOUNCER" "$W/pgbouncer118.ini" >/dev/null 2>&1 &
  DEB_PID=$!; PIDS+=("$DEB_PID"); wait_port "$DEB_PORT"
}

# --- Sluice (transaction mode, limit 20, SCRAM to clients) ------------------
SLUICE_PORT=$(free_port)
SLUICE_ADMIN=$(free_port)
SLUICE_HTTP=$(free_port)
cat > "$W/pooler.toml" <<EOF
listen_addr = "127.0.0.1:$SLUICE_PORT"
admin_addr = "127.0.0.1:$SLUICE_ADMIN"
pool_mode = "transaction"
connection_limit = $POOL
max_client_connections = $((IDLE_CLIENTS + 1000))
pool_timeout = "60s"

[server]
host = "127.0.0.1"
port = $PG_PORT
user = "$USER_NAME"
password = "$PASSWORD"

[auth]
method = "scram-sha-256"

[auth.users]
$USER_NAME = "$PASSWORD"

[http]
listen_addr = "127.0.0.1:$SLUICE_HTTP"
EOF
start_sluice() {
  RUST_LOG=warn "$SLUICE_POOLER" --config "$W/pooler.toml" >"$W/sluice.log" 2>&1 &
  SLUICE_PID=$!; PIDS+=("$SLUICE_PID"); wait_port "$SLUICE_PORT"
}
# The musl build: the same config on ports of its own.
MUSL_PORT=$(free_port)
sed -e "s/127.0.0.1:$SLUICE_PORT/127.0.0.1:$MUSL_PORT/" -e "s/127.0.0.1:$SLUICE_ADMIN/127.0.0.1:$(free_port)/" \
    -e "s/127.0.0.1:$SLUICE_HTTP/127.0.0.1:$(free_port)/" "$W/pooler.toml" > "$W/pooler-musl.toml"
start_sluice_musl() {
  RUST_LOG=warn "$SLUICE_POOLER_MUSL" --config "$W/pooler-musl.toml" >"$W/sluice-musl.log" 2>&1 &
  MUSL_PID=$!; PIDS+=("$MUSL_PID"); wait_port "$MUSL_PORT"
}

stop_pid() { kill "$1" 2>/dev/null || true; for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done; kill -9 "$1" 2>/dev/null || true; }

DEFAULT_TARGETS="postgres pgbouncer sluice"
[[ $REF_BOUNCER != "$DEBIAN_BOUNCER" ]] && DEFAULT_TARGETS+=" pgbouncer118"
[[ -x ${SLUICE_POOLER_MUSL:-} ]] && DEFAULT_TARGETS+=" sluice-musl"
read -r -a TARGETS <<<"${BENCH_TARGETS:-$DEFAULT_TARGETS}"
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
start_pgbouncer
has_target pgbouncer118 && start_pgbouncer118
has_target sluice && start_sluice
has_target sluice-musl && start_sluice_musl

port_of() { case $1 in postgres) echo "$PG_PORT";; pgbouncer) echo "$BOUNCER_PORT";; pgbouncer118) echo "$DEB_PORT";; sluice) echo "$SLUICE_PORT";; sluice-musl) echo "$MUSL_PORT";; esac; }
pid_of() { case $1 in pgbouncer) echo "$BOUNCER_PID";; pgbouncer118) echo "$DEB_PID";; sluice) echo "$SLUICE_PID";; sluice-musl) echo "$MUSL_PID";; *) echo "";; esac; }
cpu_ticks() { [[ -n $1 ]] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
# "user system" ticks of a process (0 0 without one).
cpu_split() { [[ -n $1 ]] && awk '{print $14, $15}' "/proc/$1/stat" || echo 0 0; }
TCK=$(getconf CLK_TCK)
# CPU time the hypervisor gave to other guests (the "steal" column of /proc/stat), as
# "steal total" ticks: runs during which it is high are not comparable.
steal_ticks() { awk '/^cpu /{t=0; for (i=2; i<=NF; i++) t+=$i; print $9, t}' /proc/stat; }
STEALS=()

declare -A RES
# run_pgbench TARGET SCENARIO CLIENTS MODE [extra pgbench args]
run_pgbench() {
  local target=$1 scen=$2 clients=$3 mode=$4; shift 4
  local port pid jobs=$(( clients < 2 ? 1 : 2 )) logdir=$W/log/$scen-$target
  port=$(port_of "$target"); pid=$(pid_of "$target")
  rm -rf "$logdir"; mkdir -p "$logdir"
  # pgbench's -T clock runs while it opens connections (SCRAM each, ~5 ms through a
  # pooler here), so large client counts get extra seconds; its TPS excludes connection time.
  local t0 s0 u0 k0; t0=$(cpu_ticks "$pid"); s0=$(steal_ticks); read -r u0 k0 < <(cpu_split "$pid")
  local out
  if ! out=$(cd "$logdir" && pgbench -n -S -h 127.0.0.1 -p "$port" -U "$USER_NAME" -c "$clients" -j "$jobs" \
      -T "$((DURATION + clients / 100))" -M "$mode" --log --log-prefix=tx "$@" "$DB" 2>&1); then
    log "$scen/$target failed: $(echo "$out" | grep -m1 -iE 'error|fatal|abort' || echo "$out" | tail -1)"
    RES[$scen|$target]+="fail "
    return
  fi
  local t1 s1 u1 k1 steal; t1=$(cpu_ticks "$pid"); s1=$(steal_ticks); read -r u1 k1 < <(cpu_split "$pid")
  steal=$(awk -v a="$s0" -v b="$s1" 'BEGIN{ split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; printf "%.1f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }')
  STEALS+=("$steal")
  if ! grep -q '^tps = ' <<<"$out"; then
    log "$scen/$target: no result: $(tail -3 <<<"$out" | tr '\n' ' ')"; RES[$scen|$target]+="fail "; return
  fi
  local tps lat failed txs p99 cpu user kern
  tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
  txs=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
  p99=$(cat "$logdir"/tx* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END{ if (NR) { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.3f", a[i] / 1000 } }')
  if [[ -n $pid && ${txs:-0} -gt 0 ]]; then
    cpu=$(awk -v d=$((t1 - t0)) -v tck="$TCK" -v n="$txs" 'BEGIN{printf "%.3f", d / tck / n * 10000}')
    user=$(awk -v d=$((u1 - u0)) -v tck="$TCK" -v n="$txs" 'BEGIN{printf "%.3f", d / tck / n * 10000}')
    kern=$(awk -v d=$((k1 - k0)) -v tck="$TCK" -v n="$txs" 'BEGIN{printf "%.3f", d / tck / n * 10000}')
  else cpu=- user=- kern=-; fi
  log "$scen/$target: tps=$tps lat=${lat}ms p99=${p99}ms cpu/10k=${cpu}s failed=${failed:-0} steal=${steal}%"
  RES[$scen|$target]+="$tps:$lat:$p99:$cpu:$user:$kern "
  rm -rf "$logdir"
}

SCENARIOS=("c1 1 simple" "c10 10 simple" "c100 100 simple" "c500 500 simple" "ext100 100 extended" "prep100 100 prepared" "storm50 50 simple -C")
if [[ -n ${BENCH_SCENARIOS:-} ]]; then
  picked=()
  for s in "${SCENARIOS[@]}"; do [[ " $BENCH_SCENARIOS " == *" ${s%% *} "* ]] && picked+=("$s"); done
  SCENARIOS=("${picked[@]}")
fi
for round in $(seq "$ROUNDS"); do
  log "round $round/$ROUNDS"
  # Even rounds run the targets in reverse order, so a slow drift of the machine
  # favours none of them.
  order=("${TARGETS[@]}")
  if (( round % 2 == 0 )); then order=(); for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[i]}"); done; fi
  for s in "${SCENARIOS[@]}"; do
    read -r scen clients mode extra <<<"$s"
    for t in "${order[@]}"; do
      if [[ $scen == prep100 ]] && { [[ $t == pgbouncer ]] && ! bouncer_prepares "$REF_VERSION" || [[ $t == pgbouncer118 ]] && ! bouncer_prepares "$DEB_VERSION"; }; then
        RES[$scen|$t]+="unsupported "; continue  # before 1.21: no protocol-level prepared statements in transaction mode
      fi
      # shellcheck disable=SC2086
      run_pgbench "$t" "$scen" "$clients" "$mode" $extra
    done
  done
done

# --- the HTTP front door: POST /sql against the same query over TCP -----------
# The same load generator for both: CLIENTS connections run pgbench's -S query for
# DURATION seconds, as POST /sql on keep-alive HTTP/1.1 (what neon() sends) and over TCP
# with a prepared statement; Sluice's CPU per 10k requests from /proc.
declare -A HRES
run_http() {
  local mode=$1 clients=$2 t0 t1 out
  t0=$(cpu_ticks "$SLUICE_PID")
  if [[ $mode == http ]]; then
    out=$("$SLUICE_BENCH_HTTP" http "127.0.0.1:$SLUICE_HTTP" "postgresql://$USER_NAME:$PASSWORD@127.0.0.1/$DB" "$clients" "$DURATION" 2>&1) || { log "http/$mode/$clients failed: $out"; return; }
  else
    out=$("$SLUICE_BENCH_HTTP" tcp "host=127.0.0.1 port=$SLUICE_PORT user=$USER_NAME password=$PASSWORD dbname=$DB" "$clients" "$DURATION" 2>&1) || { log "http/$mode/$clients failed: $out"; return; }
  fi
  t1=$(cpu_ticks "$SLUICE_PID")
  local n tps p50 p99 errors cpu
  read -r n tps p50 p99 errors <<<"$out"
  cpu=$(awk -v d=$((t1 - t0)) -v tck="$TCK" -v n="$n" 'BEGIN{ if (n > 0) printf "%.3f", d / tck / n * 10000; else print "-" }')
  log "http/$mode/$clients: tps=$tps p50=${p50}ms p99=${p99}ms cpu/10k=${cpu}s errors=$errors"
  HRES[$mode|$clients]+="$tps:$p50:$p99:$cpu "
}
if has_target sluice && ((${#HTTP_CLIENTS[@]})); then
  for round in $(seq "$ROUNDS"); do
    for c in "${HTTP_CLIENTS[@]}"; do
      if (( round % 2 )); then run_http tcp "$c"; run_http http "$c"; else run_http http "$c"; run_http tcp "$c"; fi
    done
  done
fi

# --- idle clients: RSS growth per client ------------------------------------
printf '\\sleep 600 s\n' > "$W/idle.sql"
idle_rss() {
  local target=$1 pid port before after n
  port=$(port_of "$target")
  # a fresh process, warmed with one query, is the baseline
  if [[ $target == pgbouncer ]]; then stop_pid "$BOUNCER_PID"; start_pgbouncer; pid=$BOUNCER_PID
  else stop_pid "$SLUICE_PID"; start_sluice; pid=$SLUICE_PID; fi
  psql -qAtX -h 127.0.0.1 -p "$port" -U "$USER_NAME" -c 'select 1' "$DB" >/dev/null
  before=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  (pgbench -n -h 127.0.0.1 -p "$port" -U "$USER_NAME" -c "$IDLE_CLIENTS" -j 2 -t 1 -f "$W/idle.sql" "$DB" >"$W/idle-$target.log" 2>&1 &
   echo $! > "$W/idle.pid")
  local deadline=$((SECONDS + 180))
  while :; do
    n=$(ss -Htn state established "( sport = :$port )" | wc -l)
    (( n >= IDLE_CLIENTS )) && break
    if (( SECONDS > deadline )); then log "idle/$target: only $n of $IDLE_CLIENTS clients connected"; break; fi
    sleep 1
  done
  sleep 2
  after=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  pkill -P "$(cat "$W/idle.pid")" 2>/dev/null || true; kill "$(cat "$W/idle.pid")" 2>/dev/null || true
  pkill -f "idle.sql" 2>/dev/null || true
  sleep 2
  awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN{ printf "%.2f:%d:%d", (a-b)/n, n, a }'
}
IDLE_BOUNCER="-:-:-" IDLE_SLUICE="-:-:-"
if (( IDLE_CLIENTS > 0 )); then
  log "idle clients: $IDLE_CLIENTS"
  IDLE_BOUNCER=$(idle_rss pgbouncer); log "idle/pgbouncer: $IDLE_BOUNCER (KiB/client:clients:RSS KiB)"
  has_target sluice && { IDLE_SLUICE=$(idle_rss sluice); log "idle/sluice: $IDLE_SLUICE"; }
fi

# --- user-space instructions per transaction (cachegrind) -------------------
# CPU seconds swing with the machine; instructions do not. Each pooler runs under
# cachegrind twice, for N1 and N2 transactions per client: the difference over the
# difference in transactions leaves out start-up and the first logins. (No SHA
# extensions under valgrind: a login's SCRAM hashing counts more than it costs.)
declare -A INSTR
INSTR_SCENARIOS=("c10 10 simple 300 1500" "ext10 10 extended 300 1500" "prep10 10 prepared 300 1500" "storm10 10 simple 10 50 -C")
# Stops the server whose command line has $1 (its config path): after the idle test the
# PIDs this shell knows are stale (it restarted them inside $(...)).
stop_match() {
  pkill -f "$1" 2>/dev/null || true
  for _ in $(seq 100); do pgrep -f "$1" >/dev/null || return 0; sleep 0.05; done
  pkill -9 -f "$1" 2>/dev/null || true
}
instr_run() {  # TARGET CLIENTS MODE TX [args]: instructions in the pooler's user space
  local target=$1 clients=$2 mode=$3 n=$4; shift 4
  local out=$W/cg.$target.out port vpid
  rm -f "$out"
  if [[ $target == pgbouncer ]]; then
    stop_match "$W/pgbouncer.ini"; port=$BOUNCER_PORT
    "${AS_NOBODY[@]}" valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$out" "$REF_BOUNCER" "$W/pgbouncer.ini" >/dev/null 2>&1 &
  elif [[ $target == sluice-musl ]]; then
    stop_match "$W/pooler-musl.toml"; port=$MUSL_PORT
    RUST_LOG=warn valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$out" "$SLUICE_POOLER_MUSL" --config "$W/pooler-musl.toml" >/dev/null 2>&1 &
  else
    stop_match "$W/pooler.toml"; port=$SLUICE_PORT
    RUST_LOG=warn valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$out" "$SLUICE_POOLER" --config "$W/pooler.toml" >/dev/null 2>&1 &
  fi
  vpid=$!
  wait_port "$port"
  sleep 0.5
  if ! kill -0 "$vpid" 2>/dev/null; then log "instructions/$target: the server under valgrind did not start"; return; fi
  pgbench -n -S -h 127.0.0.1 -p "$port" -U "$USER_NAME" -c "$clients" -j 2 -t "$n" -M "$mode" "$@" "$DB" >/dev/null 2>&1 || log "instructions/$target: pgbench failed"
  kill -INT "$vpid"; wait "$vpid" 2>/dev/null || true
  # A count only if the server under valgrind was the one that answered.
  if ! grep -q "^summary:" "$out" 2>/dev/null; then log "instructions/$target: no count (did it start?)"; return; fi
  awk '/^summary:/{print $2}' "$out"
}
if [[ ${INSTRUCTIONS:-1} != 0 ]] && has_target sluice; then
  command -v valgrind >/dev/null || { log "installing valgrind (Debian package)"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
  for s in "${INSTR_SCENARIOS[@]}"; do
    read -r scen clients mode n1 n2 extra <<<"$s"
    for t in pgbouncer sluice sluice-musl; do
      has_target "$t" || continue
      # shellcheck disable=SC2086
      a=$(instr_run "$t" "$clients" "$mode" "$n1" $extra); b=$(instr_run "$t" "$clients" "$mode" "$n2" $extra)
      INSTR[$scen|$t]=$(awk -v a="$a" -v b="$b" -v d=$(( (n2 - n1) * clients )) 'BEGIN{ if (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/) printf "%.0f", (b - a) / d; else print "-" }')
      log "instructions/$scen/$t: ${INSTR[$scen|$t]} per transaction"
    done
  done
  start_pgbouncer; start_sluice
  has_target sluice-musl && start_sluice_musl
fi

# --- report -----------------------------------------------------------------
# The median of the numbers on stdin (the mean of the middle two for an even count), or "-".
median() { tr ' ' '\n' | grep -E '^[0-9.]+$' | sort -n | awk '{a[NR]=$1} END{ if (!NR) print "-"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'; }
field() { local v=${RES[$1|$2]:-}; if [[ $v == *unsupported* ]]; then echo n/a; elif [[ -z ${v// /} || $v == fail* && $v != *:* ]]; then echo fail; else echo "$v" | tr ' ' '\n' | grep ':' | cut -d: -f"$3" | tr '\n' ' ' | median; fi; }
whole() { awk -v v="$1" 'BEGIN{ if (v ~ /^[0-9.]+$/) printf "%.0f", v; else print v }'; }
# pratio SCENARIO A B FIELD: the median over rounds of A/B, each round's A divided by the
# B measured in that same round (the machine drifts between rounds). Sets PR ("median×")
# and PRANGE ("min–max"), or both to "-".
pratio() {
  local ratios
  ratios=$(awk -v a="${RES[$1|$2]:-}" -v b="${RES[$1|$3]:-}" -v f="$4" 'BEGIN{
    na = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= na; i++) {
      split(x[i], p, ":"); split(y[i], q, ":")
      if (p[f] ~ /^[0-9.]+$/ && q[f] ~ /^[0-9.]+$/ && q[f] > 0) printf "%.6f\n", p[f] / q[f]
    } }' | sort -n)
  if [[ -z $ratios ]]; then PR=- PRANGE=-; return; fi
  PR=$(printf '%.2f×' "$(median <<<"$ratios")")
  PRANGE=$(printf '%.2f–%.2f' "$(head -1 <<<"$ratios")" "$(tail -1 <<<"$ratios")")
}
mark() { awk -v r="${1%×}" -v t="$2" -v dir="$3" 'BEGIN{ if (r !~ /^[0-9.]+$/) { print ""; exit } ok = (dir == "ge") ? (r >= t) : (r <= t); print ok ? "✓" : "✗" }'; }

{
  echo "### Pooler: sluice-pooler vs PgBouncer $REF_VERSION vs PostgreSQL direct"
  echo
  echo "$(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB; pgbench -S, scale 10, pool 20, transaction mode, SCRAM, max_prepared_statements $PREPARED on both; sluice-pooler --worker-threads $SLUICE_WORKER_THREADS (glibc build); ${DURATION}s per run, median of $ROUNDS interleaved rounds (target order reversed on even rounds); $(date -u +%Y-%m-%d). Reference: PgBouncer $REF_VERSION ($REF_BOUNCER)."
  echo
  echo "CPU steal (time the hypervisor gave other guests) per run: median $(echo "${STEALS[*]}" | median) %, max $(printf '%s\n' "${STEALS[@]}" | sort -n | tail -1) % over ${#STEALS[@]} runs. Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "CPU is the pooler's user+system seconds per 10k transactions, the figure that carries over to bigger machines; TPS and p99 swing more between rounds on a shared 2-core machine. Ratios are the median of each round's Sluice figure over the reference's in the same round (the TPS ratio's min–max over rounds in parentheses)."
  echo
  echo "| scenario | CPU s/10k tx (PgB / Sluice) | CPU ratio | PostgreSQL TPS | PgBouncer TPS | Sluice TPS | TPS ratio | p99 ms (PgB / Sluice) | p99 ratio |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for s in "${SCENARIOS[@]}"; do
    read -r scen clients mode extra <<<"$s"
    pg=$(whole "$(field "$scen" postgres 1)"); pb=$(whole "$(field "$scen" pgbouncer 1)"); sl=$(whole "$(field "$scen" sluice 1)")
    p99b=$(field "$scen" pgbouncer 3); p99s=$(field "$scen" sluice 3)
    cpub=$(field "$scen" pgbouncer 4); cpus=$(field "$scen" sluice 4)
    ref=pgbouncer; [[ $pb == n/a ]] && ref=postgres
    pratio "$scen" sluice pgbouncer 4; rc=$PR; [[ $rc != - ]] && rc="$rc $(mark "$rc" 0.8 le)"
    pratio "$scen" sluice "$ref" 1; r=$PR range=$PRANGE
    case $scen in
      c100|c500) r="$r $(mark "$r" 1.0 ge)";;
    esac
    [[ $ref == postgres ]] && r="$r of PG"
    [[ $range != - ]] && r="$r ($range)"
    pratio "$scen" sluice pgbouncer 3; rp=$PR
    case $scen in c100|c500) rp="$rp $(mark "$rp" 1.0 le)";; esac
    label="$clients clients, -M $mode${extra:+ $extra}"
    echo "| $label | $cpub / $cpus | $rc | $pg | $pb | $sl | $r | $p99b / $p99s | $rp |"
  done
  echo
  echo "Targets: CPU ratio ≤ 0.80× in every row; TPS ≥ 1.00× and p99 ≤ 1.00× at 100 and 500 clients."
  echo
  echo "#### Where the CPU goes: user space and kernel"
  echo
  echo "The same runs' CPU split into the pooler's own code (user) and the kernel's work for its system calls (kernel), in s/10k tx. Both make the same system calls per transaction (for \`-S\`, by strace: a receive and a send on each side, and a fraction of an \`epoll_wait\`), so the kernel's share is a floor that no user-space work removes: the last column is the CPU ratio Sluice would have with no user-space time at all."
  echo
  echo "| scenario | PgBouncer user / kernel | Sluice user / kernel | user ratio | kernel ratio | floor: Sluice kernel ÷ PgBouncer total |"
  echo "|---|---:|---:|---:|---:|---:|"
  for s in "${SCENARIOS[@]}"; do
    read -r scen clients mode extra <<<"$s"
    [[ $(field "$scen" pgbouncer 5) == n/a ]] && continue
    pratio "$scen" sluice pgbouncer 5; ru=$PR
    pratio "$scen" sluice pgbouncer 6; rk=$PR
    floor=$(awk -v k="$(field "$scen" sluice 6)" -v t="$(field "$scen" pgbouncer 4)" 'BEGIN{ if (k ~ /^[0-9.]+$/ && t ~ /^[0-9.]+$/ && t > 0) printf "%.2f×", k / t; else print "-" }')
    echo "| $clients clients, -M $mode${extra:+ $extra} | $(field "$scen" pgbouncer 5) / $(field "$scen" pgbouncer 6) | $(field "$scen" sluice 5) / $(field "$scen" sluice 6) | $ru | $rk | $floor |"
  done
  if has_target pgbouncer118 || has_target sluice-musl; then
    echo
    echo "#### Debian's PgBouncer $DEB_VERSION, and the static musl build of the pooler (the container image's)"
    echo
    echo "| scenario | PgBouncer $DEB_VERSION TPS | its CPU s/10k | Sluice/PgBouncer $DEB_VERSION CPU | musl Sluice TPS | musl CPU s/10k | musl/glibc CPU |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for s in "${SCENARIOS[@]}"; do
      read -r scen clients mode extra <<<"$s"
      db=$(whole "$(field "$scen" pgbouncer118 1)"); dc=$(field "$scen" pgbouncer118 4)
      pratio "$scen" sluice pgbouncer118 4; rd=$PR
      mt=$(whole "$(field "$scen" sluice-musl 1)"); mc=$(field "$scen" sluice-musl 4)
      pratio "$scen" sluice-musl sluice 4; rm=$PR; [[ $rm != - ]] && rm="$rm $(mark "$rm" 1.05 le)"
      echo "| $clients clients, -M $mode${extra:+ $extra} | $db | $dc | $rd | $mt | $mc | $rm |"
    done
    echo
    echo "Target: the musl build within 5 % of the glibc build's CPU per transaction."
  fi
  if ((${#HTTP_CLIENTS[@]})) && has_target sluice; then
    echo
    echo "#### The HTTP front door"
    echo
    echo "pgbench's -S query through Sluice from one load generator (\`sluice-bench-http\`): as \`POST /sql\` on keep-alive HTTP/1.1 connections with Neon's headers (what \`neon()\` sends: parse, bind, execute and a JSON answer per request), and over TCP with a prepared statement. Medians of $ROUNDS rounds, ${DURATION}s each."
    echo
    echo "| clients | TCP TPS | HTTP TPS | HTTP/TCP | p50 ms (TCP / HTTP) | p99 ms (TCP / HTTP) | CPU s/10k (TCP / HTTP) |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for c in "${HTTP_CLIENTS[@]}"; do
      hf() { echo "${HRES[$1|$c]:-}" | tr ' ' '\n' | grep ':' | cut -d: -f"$2" | tr '\n' ' ' | median; }
      tt=$(hf tcp 1); ht=$(hf http 1)
      ratio=$(awk -v a="$ht" -v b="$tt" 'BEGIN{ if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f×", a / b; else print "-" }')
      echo "| $c | $(whole "$tt") | $(whole "$ht") | $ratio | $(hf tcp 2) / $(hf http 2) | $(hf tcp 3) / $(hf http 3) | $(hf tcp 4) / $(hf http 4) |"
    done
  fi
  if ((${#INSTR[@]})); then
    echo
    echo "#### User-space instructions per transaction (cachegrind)"
    echo
    echo "Instructions the pooler executes in user space per transaction (per login for \`-C\`), counted by cachegrind: unlike CPU seconds they do not move with the machine's load. Marginal counts over two runs, start-up and first logins left out; the musl build runs the same code on musl's C library. Valgrind hides the SHA instructions, so the \`-C\` row counts SCRAM's hashing in plain code, and PgBouncer's count there also takes in its once-a-second housekeeping, which grows with the slower runs under valgrind (it varied 0.1–0.3 M per login between runs)."
    echo
    echo "| scenario | PgBouncer | Sluice | ratio | Sluice, musl build | musl/glibc |"
    echo "|---|---:|---:|---:|---:|---:|"
    for s in "${INSTR_SCENARIOS[@]}"; do
      read -r scen clients mode n1 n2 extra <<<"$s"
      ib=${INSTR[$scen|pgbouncer]:--} is=${INSTR[$scen|sluice]:--} im=${INSTR[$scen|sluice-musl]:--}
      r=$(awk -v a="$is" -v b="$ib" 'BEGIN{ if (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/ && b > 0) printf "%.2f×", a / b; else print "-" }')
      rm=$(awk -v a="$im" -v b="$is" 'BEGIN{ if (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/ && b > 0) printf "%.2f×", a / b; else print "-" }')
      echo "| $clients clients, -M $mode${extra:+ $extra} | $ib | $is | $r | $im | $rm |"
    done
  fi
  IFS=: read -r kb_b n_b rss_b <<<"$IDLE_BOUNCER"
  IFS=: read -r kb_s n_s rss_s <<<"$IDLE_SLUICE"
  echo
  echo "| idle clients | PgBouncer | Sluice | target |"
  echo "|---|---:|---:|---|"
  echo "| clients held | $n_b | $n_s | $IDLE_CLIENTS |"
  echo "| RSS growth per client (KiB) | $kb_b | $kb_s | Sluice ≤ 8 KiB $(awk -v k="$kb_s" 'BEGIN{ if (k ~ /^[0-9.]+$/) print (k <= 8) ? "✓" : "✗" }') |"
} | tee "$W/report.md"
[[ -n $REPORT ]] && cp "$W/report.md" "$REPORT"
log "bench-pooler took ${SECONDS}s"
exit 0
