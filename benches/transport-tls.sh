#!/usr/bin/env bash
# The transport's per-frame round trip with and without TLS, same binaries, same run: the echo
# server (packet mode) plain and with a test certificate, then each pinned to a core apart from
# the generator. Build first: cargo build --release -p parley-server -p parley-client.
#   benches/transport-tls.sh [SWEEP]      (default 100,1000; clips from ~/.cache/parley/clips/tuned)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/target/release"
clips="${CLIPS:-$HOME/.cache/parley/clips/tuned}"
sweep="${1:-100,1000}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=Parley bench CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req "${ec[@]}" -subj /CN=localhost -keyout key.pem -out leaf.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out cert.pem 2>/dev/null
base='max_sessions = 2100\npipeline = "echo"\n[echo]\nmode = "packet"\n'
printf "$base" > plain.toml
printf "$base[tls]\ncert = \"$work/cert.pem\"\nkey = \"$work/key.pem\"\n" > tls.toml

run() { # NAME CONFIG PORT URL [SERVER_PIN CLIENT_PIN]
    local pin_server=() pin_client=()
    [[ $# -gt 4 ]] && pin_server=(taskset -c "$5") && pin_client=(taskset -c "$6")
    "${pin_server[@]}" "$bin/parley-server" --config "$2" --listen "127.0.0.1:$3" > "server-$1.log" 2>&1 &
    local pid=$!
    sleep 1.5
    PARLEY_CA_FILE="$work/ca.pem" "${pin_client[@]}" "$bin/parley" bench --transport --sweep "$sweep" --seconds 10 \
        --server "$4" --input-dir "$clips" --report "$work/$1.json" > "bench-$1.log" 2>&1
    kill -TERM "$pid"
    wait "$pid" || true
    echo "== $1"
    grep -E '^\| (streams|[0-9])' "bench-$1.log"
}
run plain plain.toml 8111 ws://127.0.0.1:8111
run tls tls.toml 8112 wss://localhost:8112
run plain-pinned plain.toml 8113 ws://127.0.0.1:8113 0 1
run tls-pinned tls.toml 8114 wss://localhost:8114 0 1
