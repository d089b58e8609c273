#!/usr/bin/env bash
# A single-node Ceph (mon + osd + radosgw) on 127.0.0.1, everything under
# one folder, for the S3 store tests. Needs Debian's radosgw ceph-mon
# ceph-osd uuid-runtime curl (installed by .ci/run).
#
#   tests/s3/rgw.sh start DIR   # prints the S3 environment (and bucket uve-test), also in DIR/env
#   tests/s3/rgw.sh stop DIR    # stops the daemons by PID, removes DIR
#
# The recipe (auth none, size-1 pools, bluestore on a sparse file, CRUSH by
# hand because Pacific's OSD can die sending commands with a zero fsid when
# it updates CRUSH itself) is the one verified in shared/S3-STORE.md.
set -euo pipefail
verb=${1:-}; dir=${2:-}
[ -n "$verb" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

stop() {
  for p in "$dir"/pids/*; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    kill "$pid" 2>/dev/null || true
  done
  for p in "$dir"/pids/*; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

wait_for() { # seconds, command...
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.5
  done
}

start() {
  mkdir -p "$dir"/{run,log,mon,osd,rgw,pids}
  dir=$(cd "$dir" && pwd)
  local fsid mon_port rgw_port conf
  fsid=$(uuidgen); mon_port=$(free_port); rgw_port=$(free_port)
  conf="$dir/ceph.conf"
  cat > "$conf" <<CONF
[global]
fsid = $fsid
mon_host = v1:127.0.0.1:$mon_port
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
# A throw-away cluster on a shared disk (CI's has run at 3 % free): the
# monitor refuses to start only when the disk is full.
mon_data_avail_crit = 0
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
run_dir = $dir/run
admin_socket = $dir/run/\$cluster-\$name.asok
log_file = $dir/log/\$cluster-\$name.log
pid_file = $dir/run/\$cluster-\$name.pid
keyring = /dev/null
mon_data = $dir/mon/\$cluster-\$id
osd_data = $dir/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_path = $dir/osd/block-\$id
bluestore_block_create = true
bluestore_block_size = 21474836480
bluestore_fsck_on_mkfs = false
bluestore_cache_size = 268435456
osd_memory_target = 943718400
osd_class_update_on_start = false
osd_crush_update_on_start = false

[client.rgw.a]
# tcp_nodelay: without it beast answers in two segments and every other
# request on a kept-alive connection waits ~40 ms for a delayed ACK.
rgw_frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
rgw_data = $dir/rgw
CONF
  monmaptool --create --addv a "v1:127.0.0.1:$mon_port" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >/dev/null 2>&1
  ceph-mon -c "$conf" -f -i a >"$dir/log/mon.out" 2>&1 &
  echo $! > "$dir/pids/mon"
  wait_for 60 timeout 5 ceph -c "$conf" -s || { echo "ceph-mon did not come up" >&2; return 1; }

  local osd_uuid id
  osd_uuid=$(uuidgen)
  id=$(timeout 20 ceph -c "$conf" osd new "$osd_uuid")
  mkdir -p "$dir/osd/ceph-$id"
  ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.out" 2>&1
  timeout 20 ceph -c "$conf" osd crush add "osd.$id" 1.0 root=default host=localhost >/dev/null 2>&1
  ceph-osd -c "$conf" -f -i "$id" >"$dir/log/osd.out" 2>&1 &
  echo $! > "$dir/pids/osd"
  wait_for 90 sh -c "timeout 5 ceph -c '$conf' osd stat | grep -q '1 up'" \
    || { echo "ceph-osd did not come up" >&2; return 1; }

  radosgw -c "$conf" -f -n client.rgw.a >"$dir/log/rgw.out" 2>&1 &
  echo $! > "$dir/pids/rgw"
  wait_for 120 curl -sf "http://127.0.0.1:$rgw_port/" || { echo "radosgw did not come up" >&2; return 1; }

  local key=uvetestaccesskey secret=uvetestsecretkey0123456789
  timeout 30 radosgw-admin -c "$conf" user create --uid=test --display-name=test \
    --access-key="$key" --secret-key="$secret" >/dev/null
  # The bucket the tests use (each test under its own key prefix).
  curl -sf -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$key:$secret" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "http://127.0.0.1:$rgw_port/uve-test" >/dev/null \
    || { echo "cannot create bucket uve-test" >&2; return 1; }
  cat > "$dir/env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$rgw_port
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
export UVE_S3_BUCKET=uve-test
ENV
  cat "$dir/env"
}

case "$verb" in
  start) if ! start; then tail -n 20 "$dir"/log/* >&2 2>/dev/null || true; stop; exit 1; fi ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
