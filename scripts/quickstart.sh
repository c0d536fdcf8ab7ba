#!/usr/bin/env bash
# berth's main job, end to end, on a fresh Debian 12 machine (run as root):
# install berth, start berthd on its default config, talk to it with the `berth` CLI, stop it.
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

echo "== stopping berthd"
kill -TERM "$daemon"
wait "$daemon" && echo "berthd stopped cleanly"
trap - EXIT
