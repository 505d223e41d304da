#!/usr/bin/env bash
# docs/serve/nginx.conf, run as written: two `aviary serve` replicas on loopback behind an
# unprivileged nginx (its pid, logs and temp files in a temporary directory), checked for
# conversation affinity, SSE streaming through the proxy, errors, state-cache hits on a
# conversation's second turn, and a short load test through the proxy.
#
# usage: tests/serve/nginx_test.sh AVIARY_BINARY MODEL_PATH
# Exits 77 (skipped) when nginx, curl or the model is missing, except under CI=true, where that
# fails.
set -euo pipefail

skip() {
  if [[ "${CI:-}" == true ]]; then
    echo "FAIL: $* (CI=true: required)" >&2
    exit 1
  fi
  echo "SKIP: $*" >&2
  exit 77
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

[[ $# -eq 2 ]] || {
  echo "usage: $0 AVIARY_BINARY MODEL_PATH" >&2
  exit 2
}
aviary=$1
model=$2
recipe="$(cd "$(dirname "$0")/../.." && pwd)/docs/serve/nginx.conf"

[[ -x $aviary ]] || fail "not an executable: $aviary"
[[ -f $recipe ]] || fail "recipe not found: $recipe"
nginx=$(command -v nginx || true)
[[ -z $nginx && -x /usr/sbin/nginx ]] && nginx=/usr/sbin/nginx
[[ -n $nginx ]] || skip "nginx not installed (apt install nginx-light)"
command -v curl >/dev/null || skip "curl not installed (apt install curl)"
[[ -f $model ]] || skip "model not found: $model (needs ../shared)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/aviary-nginx.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

show_logs() {
  local f
  for f in "$tmp"/replica*.err "$tmp"/error.log; do
    [[ -s $f ]] && {
      echo "--- $f" >&2
      tail -n 20 "$f" >&2
    }
  done
  return 0
}
die() {
  show_logs
  fail "$@"
}

# ---- Two replicas on free ports; each prints its address once it accepts connections.
declare -a replica_pid replica_url
for i in 0 1; do
  "$aviary" serve --model "$model" --host 127.0.0.1 --port 0 --parallel 2 \
    >"$tmp/replica$i.out" 2>"$tmp/replica$i.err" &
  replica_pid[i]=$!
  pids+=("$!")
done
for i in 0 1; do
  for ((t = 0; t < 600; ++t)); do
    line=$(grep -m1 '^aviary serve: listening on http://' "$tmp/replica$i.out" || true)
    [[ -n $line ]] && break
    kill -0 "${replica_pid[i]}" 2>/dev/null || die "replica $i exited before listening"
    sleep 0.1
  done
  [[ -n $line ]] || die "replica $i printed no listening line within 60 s"
  replica_url[i]=${line#aviary serve: listening on }
  [[ ${replica_url[i]} =~ ^http://127\.0\.0\.1:[0-9]+$ ]] ||
    die "replica $i: unexpected listening line: $line"
done
echo "replicas: pid ${replica_pid[0]} at ${replica_url[0]}, pid ${replica_pid[1]} at ${replica_url[1]}"

# ---- nginx: the recipe with the replicas' and a free port, inside a minimal main config.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s|127\.0\.0\.1:8081|${replica_url[0]#http://}|" \
  -e "s|127\.0\.0\.1:8082|${replica_url[1]#http://}|" \
  -e "s|listen 127\.0\.0\.1:8080;|listen 127.0.0.1:$port;|" "$recipe" >"$tmp/aviary.conf"
for want in "${replica_url[0]#http://}" "${replica_url[1]#http://}" "listen 127.0.0.1:$port;"; do
  grep -qF "$want" "$tmp/aviary.conf" || fail "the recipe no longer has the lines this test rewrites ($want)"
done
user_line=""
# As root, nginx's workers would switch to "nobody", who cannot use the temporary directory.
[[ $(id -u) -eq 0 ]] && user_line="user $(id -un) $(id -gn);"
mkdir -p "$tmp/temp"
cat >"$tmp/nginx.conf" <<EOF
$user_line
daemon off;
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/error.log notice;
events { worker_connections 256; }
http {
  access_log $tmp/access.log;
  client_body_temp_path $tmp/temp/body;
  proxy_temp_path $tmp/temp/proxy;
  fastcgi_temp_path $tmp/temp/fastcgi;
  uwsgi_temp_path $tmp/temp/uwsgi;
  scgi_temp_path $tmp/temp/scgi;
  include $tmp/aviary.conf;
}
EOF
"$nginx" -t -q -p "$tmp/" -c "$tmp/nginx.conf" -e "$tmp/error.log" 2>"$tmp/nginx-t.err" || {
  cat "$tmp/nginx-t.err" >&2
  die "nginx -t rejected the recipe"
}
"$nginx" -p "$tmp/" -c "$tmp/nginx.conf" -e "$tmp/error.log" 2>>"$tmp/error.log" &
nginx_pid=$!
pids+=("$nginx_pid")
proxy="http://127.0.0.1:$port"
for ((t = 0; t < 100; ++t)); do
  curl -sf -o /dev/null --max-time 2 "$proxy/health" && break
  kill -0 "$nginx_pid" 2>/dev/null || die "nginx exited"
  sleep 0.1
done
curl -sf -o /dev/null --max-time 5 "$proxy/health" || die "GET /health through nginx failed"
echo "nginx: pid $nginx_pid at $proxy"

# request METHOD URL [BODY [HEADER...]]: sets $status, $body, $instance (X-Aviary-Instance).
request() {
  local method=$1 url=$2 data=${3:-}
  shift 3 || shift $#
  local args=(-sS -X "$method" --max-time 120 -D "$tmp/headers" -o "$tmp/body" -w '%{http_code}')
  local h
  for h in "$@"; do args+=(-H "$h"); done
  [[ -n $data ]] && args+=(-H 'Content-Type: application/json' --data-binary "$data")
  status=$(curl "${args[@]}" "$url") || die "$method $url: connection failed"
  body=$(cat "$tmp/body")
  instance=$(tr -d '\r' <"$tmp/headers" | awk 'tolower($1) == "x-aviary-instance:" { print $2 }' | tail -n1)
}
replica_of() {  # the replica index serving pid $1
  local i
  for i in 0 1; do [[ ${replica_pid[i]} == "$1" ]] && echo "$i" && return; done
  die "X-Aviary-Instance '$1' is neither replica's pid (${replica_pid[*]})"
}

# ---- Affinity: each conversation id always reaches the same replica; ids spread over both.
declare -A seen_replicas=()
for c in $(seq 1 16); do
  first=""
  for r in 1 2 3; do
    request GET "$proxy/health" "" "X-Conversation-Id: conv-$c"
    [[ $status == 200 ]] || die "GET /health (conversation conv-$c): status $status"
    [[ -n $instance ]] || die "response without X-Aviary-Instance"
    idx=$(replica_of "$instance")
    [[ -z $first ]] && first=$idx
    [[ $idx == "$first" ]] || die "conversation conv-$c reached replica $first, then replica $idx"
  done
  seen_replicas[$first]=1
done
((${#seen_replicas[@]} == 2)) || die "16 conversation ids all reached one replica: no spreading"
# Without the header, the client's address is the key: the same replica every time.
first=""
for r in 1 2 3 4; do
  request GET "$proxy/health" ""
  idx=$(replica_of "$instance")
  [[ -z $first ]] && first=$idx
  [[ $idx == "$first" ]] || die "requests without X-Conversation-Id from one address reached both replicas"
done
echo "ok: affinity (16 conversation ids, each always on one replica, both replicas used)"

# ---- Streaming through nginx: server-sent events ending with [DONE].
request POST "$proxy/v1/completions" \
  '{"prompt": "In the beginning", "max_tokens": 16, "temperature": 0, "stream": true}' \
  "X-Conversation-Id: stream-1"
[[ $status == 200 ]] || die "streamed completion: status $status: $body"
tr -d '\r' <"$tmp/headers" | grep -qi '^content-type: text/event-stream' ||
  die "streamed completion: Content-Type is not text/event-stream"
events=$(grep -c '^data: ' "$tmp/body" || true)
((events >= 3)) || die "streamed completion: $events SSE events (want chunks, then [DONE]): $body"
last=$(grep '^data: ' "$tmp/body" | tail -n1)
[[ $last == 'data: [DONE]' ]] || die "streamed completion: last event is '$last', not [DONE]"
# Every event is "data: ..." followed by a blank line; lines starting with ':' are comments.
if grep -v -e '^data: ' -e '^:' "$tmp/body" | grep -q .; then die "streamed completion: lines outside SSE events: $body"; fi
streamed=$(grep '^data: {' "$tmp/body" | sed 's/^data: //' |
  python3 -c 'import json, sys; print("".join(json.loads(l)["choices"][0]["text"] for l in sys.stdin if json.loads(l)["choices"]), end="")')
request POST "$proxy/v1/completions" \
  '{"prompt": "In the beginning", "max_tokens": 16, "temperature": 0}' "X-Conversation-Id: stream-1"
whole=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"], end="")' <"$tmp/body")
[[ $streamed == "$whole" ]] || die "streamed text '$streamed' differs from the whole reply '$whole'"
echo "ok: streaming ($events events ending with [DONE], text equals the unstreamed reply)"

# ---- Errors keep the API's shape through nginx: the replica's 400, nginx's own 413.
request POST "$proxy/v1/chat/completions" '{"messages": "not a list"}' "X-Conversation-Id: e"
[[ $status == 400 ]] || die "malformed request through nginx: status $status"
python3 -c 'import json, sys; e = json.load(sys.stdin)["error"]; assert isinstance(e["message"], str)' \
  <"$tmp/body" || die "malformed request: not an OpenAI error object: $body"
python3 -c 'print("{\"prompt\": \"" + "x" * (2 << 20) + "\"}")' >"$tmp/big.json"
request POST "$proxy/v1/completions" "@$tmp/big.json" "X-Conversation-Id: e"
[[ $status == 413 ]] || die "2 MiB body through nginx: status $status"
python3 -c 'import json, sys; e = json.load(sys.stdin)["error"]; assert isinstance(e["message"], str)' \
  <"$tmp/body" || die "2 MiB body: not an OpenAI error object: $body"
echo "ok: errors (400 from the replica, 413 from nginx, both OpenAI error objects)"

# ---- State cache: a conversation's second turn reaches the same replica and hits its cache.
# cache_hits URL: the replica's state-cache hit counter from its /metrics.
cache_hits() {
  local metrics
  metrics=$(curl -sSf --max-time 10 "$1/metrics") || die "GET $1/metrics failed"
  local v
  v=$(awk '$1 ~ /^aviary_state_cache_hits(_total)?$/ { print $2 }' <<<"$metrics")
  [[ -n $v ]] || die "no aviary_state_cache_hits_total in $1/metrics"
  printf '%.0f\n' "$v"
}
turn1='{"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 12, "temperature": 0}'
request POST "$proxy/v1/chat/completions" "$turn1" "X-Conversation-Id: cache-conversation-7"
[[ $status == 200 ]] || die "turn 1: status $status: $body"
idx1=$(replica_of "$instance")
reply=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"], end="")' <"$tmp/body")
hits_before=$(cache_hits "${replica_url[idx1]}")
turn2=$(REPLY="$reply" python3 -c 'import json, os; print(json.dumps({"messages": [
  {"role": "user", "content": "Tell me about the sea."},
  {"role": "assistant", "content": os.environ["REPLY"]},
  {"role": "user", "content": "And the rivers?"}], "max_tokens": 12, "temperature": 0}))')
request POST "$proxy/v1/chat/completions" "$turn2" "X-Conversation-Id: cache-conversation-7"
[[ $status == 200 ]] || die "turn 2: status $status: $body"
idx2=$(replica_of "$instance")
[[ $idx2 == "$idx1" ]] || die "turn 2 reached replica $idx2, turn 1 replica $idx1"
hits_after=$(cache_hits "${replica_url[idx1]}")
((hits_after > hits_before)) ||
  die "turn 2 did not hit replica $idx1's state cache (hits $hits_before -> $hits_after)"
echo "ok: state cache (turn 2 on replica $idx1, cache hits $hits_before -> $hits_after)"

# ---- Load through nginx: concurrent streaming clients spread over both replicas by their
# conversation ids, every greedy reply equal to the same request's reply alone.
node=$(command -v node || command -v nodejs || true)
if [[ -n $node ]]; then
  "$node" "$(dirname "$0")/load_test.mjs" --url "$proxy" --clients 6 --seconds 4 --max-tokens 16 \
    --out "$tmp/load.json" >/dev/null 2>"$tmp/load.err" || {
    cat "$tmp/load.err" >&2
    die "load test through nginx failed"
  }
  echo "ok: load through nginx ($(tail -n 2 "$tmp/load.err" | head -n 1))"
elif [[ "${CI:-}" == true ]]; then
  die "node not installed (apt install nodejs; CI=true: required)"
else
  echo "skipped: load through nginx (node not installed)"
fi

# ---- Shutdown: SIGTERM ends each replica with status 0.
for i in 0 1; do
  kill -TERM "${replica_pid[i]}"
  rc=0
  wait "${replica_pid[i]}" || rc=$?
  ((rc == 0)) || die "replica $i exited with status $rc after SIGTERM"
done
echo "PASS"
