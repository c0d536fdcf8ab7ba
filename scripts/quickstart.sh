#!/usr/bin/env bash
# berth's main job, end to end, on a fresh Debian 12 machine (run as root):
# install berth, start berthd on its default config, talk to it with the `berth` CLI, build a small
# busybox image locally (no internet), import it (unpacked into overlayfs), run containers from it
# (one that prints a greeting, one detached whose log is followed), stop berthd.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
scripts/setup.sh

bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
berthd="$bindir/berthd"
berth="$bindir/berth"
address=/run/berth/berth.sock
log=$(mktemp /tmp/berthd.XXXXXX.log)

echo "== starting berthd on the default config (log: $log)"
"$berthd" >"$log" 2>&1 &
daemon=$!
stop_daemon() {
    if kill -0 "$daemon" 2>/dev/null; then
        kill -TERM "$daemon"
        wait "$daemon" || true
    fi
}
trap stop_daemon EXIT

for _ in $(seq 100); do
    "$berth" --address "$address" version >/dev/null 2>&1 && break
    kill -0 "$daemon" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done

echo "== berth version"
"$berth" --address "$address" version
echo "== berth plugins ls"
"$berth" --address "$address" plugins ls
echo "== an event, as it happens"
"$berth" --address "$address" events 'topic=="/namespaces/create"' &
events=$!
sleep 0.5
"$berth" --address "$address" namespaces create hello greeting=ahoy
sleep 0.3
kill -TERM "$events"; wait "$events" 2>/dev/null || true
echo "== berth namespaces ls"
"$berth" --address "$address" namespaces ls
"$berth" --address "$address" namespaces rm hello >/dev/null

echo "== a busybox image built here from Debian's busybox-static, imported and unpacked"
work=$(mktemp -d /tmp/berth-quickstart.XXXXXX)
"$PYTHON" - "$work/busybox.tar" <<'PY'
import sys
sys.path.insert(0, "tests")
from imagebuild import busybox_image, write_oci_archive
write_oci_archive(sys.argv[1], {"localhost/busybox:latest": busybox_image()})
PY
imported=$("$berth" --address "$address" images import "$work/busybox.tar")
echo "$imported"
"$berth" --address "$address" images ls
"$berth" --address "$address" images check
echo "== berth run: a container from that image prints a greeting (its exit status is berth's)"
"$berth" --address "$address" run --rm localhost/busybox:latest hello \
    sh -c 'echo "Hello from berth: $(hostname), pid $$, $(id -un) in $(pwd)"'
echo "== a detached one, its log, and its end"
"$berth" --address "$address" run -d localhost/busybox:latest ticker sh -c 'for i in 1 2 3; do echo tick $i; sleep 0.2; done; exit 3'
"$berth" --address "$address" tasks ls
"$berth" --address "$address" logs --follow ticker
"$berth" --address "$address" tasks rm ticker
"$berth" --address "$address" containers rm ticker
"$berth" --address "$address" images rm --sync localhost/busybox:latest
rm -rf "$work"

echo "== stopping berthd"
kill -TERM "$daemon"
wait "$daemon" && echo "berthd stopped cleanly"
trap - EXIT
