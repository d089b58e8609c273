#!/usr/bin/env bash
# Schemathesis against the real daemon: generates requests from
# host/openapi.json (valid and invalid ones, then stateful sequences) and
# fails on any answer the document does not allow (--checks all).
#
#   host/tests/schemathesis/run.sh [extra schemathesis arguments]
#
# What it does, all of it undone on exit (trap: each process it started
# leads a process group of its own, and those groups are killed by their
# PIDs; the scratch directory is removed):
#   1. installs the pinned Schemathesis (requirements.txt beside this file)
#      into a virtualenv, target/schemathesis-venv, reused while the pins
#      are unchanged;
#   2. starts a copy of the release uve-host (UVE_HOST_BIN overrides) on a
#      scratch data directory under /tmp, as the unprivileged user `nobody`
#      when run as root (else as the user running it): POST /v1/vms makes
#      sockets at the paths it is given; relative ones land in the scratch
#      directory, and nobody cannot create them anywhere that matters;
#   3. bridges 127.0.0.1:<free port> to the API's Unix socket with socat
#      (TCP and UNIX addresses only), since Schemathesis speaks TCP;
#   4. runs Schemathesis with a fixed seed and a budget of about a minute
#      (SCHEMATHESIS_SEED, SCHEMATHESIS_MAX_TIME override), its settings in
#      schemathesis.toml beside this file and hooks.py (what each steers,
#      and why).
# Exit status: Schemathesis's own (0 only with no failure and no error).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"

bin=${UVE_HOST_BIN:-$root/target/release/uve-host}
venv=${SCHEMATHESIS_VENV:-$root/target/schemathesis-venv}
seed=${SCHEMATHESIS_SEED:-20260}
max_time=${SCHEMATHESIS_MAX_TIME:-60}

[ -x "$bin" ] || { echo "schemathesis: no $bin (cargo build --release -p uve-host)" >&2; exit 1; }
bin=$(realpath "$bin")

need_root_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "schemathesis: $1 is missing and only root can install it" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v socat >/dev/null 2>&1 || need_root_install socat
python3 -c 'import ensurepip, venv' 2>/dev/null || need_root_install python3-venv

# 1. The pinned Schemathesis.
stamp=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  echo "$stamp" > "$venv/.requirements"
fi
"$venv/bin/schemathesis" --version

# 2. The daemon, unprivileged, on scratch data.
scratch=$(mktemp -d /tmp/uve-schemathesis.XXXXXX)
pids=()
cleanup() {
  local status=$?
  # Each was started by setsid as the leader of its own process group:
  # the group (its PID) is killed, so socat's per-connection children die
  # with it.
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$scratch"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

data=$scratch/data
mkdir -p "$data"
chmod 755 "$scratch"
cat > "$scratch/host.toml" <<EOF
data_dir = "$data"
# Small limits: generated imports and bundles stay small, and a run cannot
# fill the disk.
max_import = 16777216
max_ua_bundle = 16777216
uve2_timeout_ms = 2000
EOF
# A copy of the binary in the scratch directory: nobody may not be allowed
# into the directory of the checkout.
install -m 755 "$bin" "$scratch/uve-host"
as_user=()
if [ "$(id -u)" -eq 0 ]; then
  chown -R nobody:nogroup "$data"
  as_user=(setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs --)
fi
log=$scratch/host.log
# setsid: a group of its own (a background job of this script is no group
# leader, so setsid execs in place and $! is the daemon's PID).
(cd "$data" && exec setsid "${as_user[@]}" "$scratch/uve-host" run --config "$scratch/host.toml") >"$log" 2>&1 &
pids+=($!)
sock=$data/api.sock
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "schemathesis: uve-host did not come up:" >&2; cat "$log" >&2; exit 1; }

# 3. 127.0.0.1:<port> -> the API socket.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Its per-connection complaints (a client that closed first) go to a log.
setsid "${as_user[@]}" socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$sock" \
  2>"$scratch/socat.log" &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

# 4. The run. Its HAR (every request and answer) stays in target/ for a
# look after a failure; the number of requests is printed from it.
report=$root/target/schemathesis-report/run.har
mkdir -p "$(dirname "$report")"
set +e
SCHEMATHESIS_HOOKS="$here/hooks.py" "$venv/bin/schemathesis" \
  --config-file "$here/schemathesis.toml" run "$root/host/openapi.json" \
  --url "http://127.0.0.1:$port" --checks all --seed "$seed" --max-time "$max_time" \
  --no-color --report har --report-har-path "$report" "$@"
status=$?
set -e
python3 - "$report" <<'PY' || true
import json, sys
entries = json.load(open(sys.argv[1]))["log"]["entries"]
print(f"requests sent: {len(entries)}")
PY
if [ "$status" -ne 0 ]; then
  echo "--- uve-host log (last 40 lines) ---" >&2
  tail -40 "$log" >&2
fi
exit "$status"
