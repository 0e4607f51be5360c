# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for infra/up and infra/down. Sourced, not run.
# Every setting can be overridden from the environment; see infra/README.md.

INFRA_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INFRA_HOME/.." && pwd)"

RUN_DIR="${CAIRN_INFRA_DIR:-$REPO_ROOT/target/infra}"
CACHE_DIR="${CAIRN_INFRA_CACHE:-$HOME/.cache/cairn-infra}"
START_TIMEOUT="${CAIRN_INFRA_TIMEOUT:-180}"
STOP_TIMEOUT="${CAIRN_INFRA_STOP_TIMEOUT:-60}"

KAFKA_VERSION="${CAIRN_KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${CAIRN_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${CAIRN_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_HEAP="${CAIRN_KAFKA_HEAP:-512m}"

CASSANDRA_VERSION="${CAIRN_CASSANDRA_VERSION:-5.0.9}"
CASSANDRA_PORT="${CAIRN_CASSANDRA_PORT:-19042}"
CASSANDRA_STORAGE_PORT="${CAIRN_CASSANDRA_STORAGE_PORT:-17000}"
CASSANDRA_HEAP="${CAIRN_CASSANDRA_HEAP:-1G}"

if [[ -n "${CAIRN_INFRA_JAVA:-}" ]]; then
  JAVA_BIN="$CAIRN_INFRA_JAVA"
elif [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
  JAVA_BIN="$JAVA_HOME/bin/java"
else
  JAVA_BIN="java"
fi

ALL_SERVICES=(kafka cassandra)

PROG="infra/$(basename "$0")"

# All progress goes to stderr: stdout of infra/up is reserved for the `export` lines.
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

now() { date +%s.%N; }
# seconds since $1 (a `now` value), one decimal
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# true when something accepts TCP connections on 127.0.0.1:$1
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

svc_dir() { printf '%s/%s' "$RUN_DIR" "$1"; }
pid_file() { printf '%s/%s/%s.pid' "$RUN_DIR" "$1" "$1"; }
log_file() { printf '%s/%s/%s.log' "$RUN_DIR" "$1" "$1"; }

# The client-facing port of a service: the one recorded when it was started, else the configured one.
svc_port() {
  local f
  f="$(svc_dir "$1")/port"
  if [[ -s "$f" ]]; then cat "$f"; return; fi
  case "$1" in
    kafka) echo "$KAFKA_PORT" ;;
    cassandra) echo "$CASSANDRA_PORT" ;;
  esac
}

# true while the process exists and is not a zombie (a zombie has an empty /proc/<pid>/cmdline;
# note that files in /proc report size 0, so `test -s` cannot tell)
pid_running() {
  kill -0 "$1" 2>/dev/null || return 1
  [[ -r "/proc/$1/cmdline" ]] || return 0
  [[ -n "$(tr -d '\0' <"/proc/$1/cmdline" 2>/dev/null)" ]]
}

# Prints the pid of the service's process if its pid file names a live process that infra/up started
# for this run dir (the JVM command line carries -Dcairn.infra.service=... and -Dcairn.infra.dir=...,
# which guards against a recycled pid). Returns 1 otherwise.
live_pid() {
  local f pid cmd
  f="$(pid_file "$1")"
  [[ -f "$f" ]] || return 1
  pid="$(<"$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  pid_running "$pid" || return 1
  [[ -r "/proc/$pid/cmdline" ]] || { echo "$pid"; return 0; }
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  [[ "$cmd" == *"-Dcairn.infra.service=$1 "* && "$cmd" == *"-Dcairn.infra.dir=$RUN_DIR "* ]] || return 1
  echo "$pid"
}

# Serialises infra/up and infra/down on one run dir (two test jobs calling infra/up at once would
# otherwise both try to start the same servers). The lock is fd 9; spawned servers must not inherit it.
take_lock() {
  mkdir -p "$RUN_DIR"
  command -v flock >/dev/null 2>&1 || return 0
  exec 9>"$RUN_DIR/.lock"
  if ! flock -n 9; then
    log "waiting for another infra/up or infra/down on $RUN_DIR ..."
    flock -w $((START_TIMEOUT + STOP_TIMEOUT + 120)) 9 || die "gave up waiting for the lock on $RUN_DIR/.lock"
  fi
}

# Parses service names from the arguments into the global array SERVICES (default: all).
parse_services() {
  SERVICES=()
  local a
  for a in "$@"; do
    case "$a" in
      kafka | cassandra) [[ " ${SERVICES[*]-} " == *" $a "* ]] || SERVICES+=("$a") ;;
      *) die "unknown service '$a' (expected: kafka, cassandra)" ;;
    esac
  done
  if [[ ${#SERVICES[@]} -eq 0 ]]; then SERVICES=("${ALL_SERVICES[@]}"); fi
}

# Sends SIGTERM, waits up to STOP_TIMEOUT seconds, then SIGKILL. Removes the pid file.
stop_service() {
  local svc="$1" pid t0 waited=0
  if ! pid="$(live_pid "$svc")"; then
    if [[ -f "$(pid_file "$svc")" ]]; then
      log "$svc: not running (removing stale pid file)"
      rm -f "$(pid_file "$svc")"
    else
      log "$svc: not running"
    fi
    return 0
  fi
  t0="$(now)"
  log "$svc: stopping pid $pid (SIGTERM) ..."
  kill -TERM "$pid" 2>/dev/null || true
  while pid_running "$pid"; do
    if ((waited >= STOP_TIMEOUT * 5)); then
      log "$svc: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  rm -f "$(pid_file "$svc")"
  log "$svc: stopped in $(since "$t0")s"
}
