#!/usr/bin/env bash
# Set everything up, run boneage-worker on its embedded defaults (SQLite database,
# SQLite broker, spool in ./var/demo), send it a synthetic hand radiograph with
# dcmtk's storescu, and show the Structured Report and the heat-map image that come
# back to a stand-in PACS (dcmtk's storescp).
#
#   scripts/demo.sh                 run the demo, then stop the service
#   scripts/demo.sh --keep-running  leave the service running (Ctrl-C stops it)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Not the venv on PATH: pynetdicom installs scripts named storescu/storescp that would
# hide dcmtk's.
bw="$PWD/.venv/bin/boneage-worker"

demo=${BONEAGE_DEMO_DIR:-$PWD/var/demo}
rm -rf "$demo"
mkdir -p "$demo/pacs" "$demo/stored"
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $what" >&2; return 1; }
    sleep 0.5
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pacs_port=$(free_port)
export BONEAGE_PORT=${BONEAGE_PORT:-$(free_port)}
export BONEAGE_DATA_DIR="$demo/data"
export BONEAGE_DESTINATIONS="DEMOPACS@127.0.0.1:$pacs_port"
export BONEAGE_ALLOWED_AETS="DEMOSCU"

echo "==> stand-in PACS (storescp) as DEMOPACS on port $pacs_port"
storescp --aetitle DEMOPACS --output-directory "$demo/pacs" \
  --exec-on-reception "touch '$demo/stored/#f'" "$pacs_port" &
pacs_pid=$!
echo "==> boneage-worker serve on port $BONEAGE_PORT (log: $demo/serve.log)"
"$bw" serve >"$demo/serve.log" 2>&1 &
serve_pid=$!
cleanup() {
  kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null || true
  kill "$pacs_pid" 2>/dev/null || true
}
trap cleanup EXIT
wait_until 120 "the listener" port_open "$BONEAGE_PORT"

echo "==> a synthetic hand radiograph (a phantom, girl of 9 y 2 mo) sent with storescu"
"$bw" demo-image "$demo/hand.dcm" --age-months 110 --sex F
storescu -aet DEMOSCU -aec BONEAGE 127.0.0.1 "$BONEAGE_PORT" "$demo/hand.dcm"

# storescp writes each file in place, and marks it in $demo/stored once it is whole.
received() { [[ $(find "$demo/stored" -type f | wc -l) -ge 2 ]]; }
wait_until 300 "the SR and SC at the PACS" received
sr=$(grep -l -a "1.2.840.10008.5.1.4.1.1.88.33" "$demo"/pacs/* | head -n1)
sc=$(grep -L -a "1.2.840.10008.5.1.4.1.1.88.33" "$demo"/pacs/* | head -n1)
echo
echo "==> the Structured Report that came back (dsrdump):"
dsrdump "$sr" | sed -n '/Measurement Group/,$p'
dcmj2pnm --write-png --nointerlace "$sc" "$demo/heatmap.png"
echo
echo "==> the heat-map Secondary Capture, rendered by dcmj2pnm: $demo/heatmap.png"
echo
"$bw" status || true
if [[ "${1:-}" == "--keep-running" ]]; then
  echo "service still running (Ctrl-C stops it); send more with: storescu -aet DEMOSCU -aec BONEAGE 127.0.0.1 $BONEAGE_PORT FILE"
  wait "$serve_pid"
fi
