#!/usr/bin/env bash
# A short tour of tether: start an agent on loopback, run a few commands
# against it, stop it. `make demo` runs this with the virtualenv's bin first
# on PATH; run by hand, it needs `tether` on PATH (e.g. after `make install`,
# PATH="$PWD/.venv/bin:$PATH" bash bench/demo.sh).
set -euo pipefail

if ! command -v tether >/dev/null 2>&1; then
    echo "demo: no 'tether' on PATH; run 'make demo' (or 'make install' first)" >&2
    exit 1
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tether-demo.XXXXXX")
LOG="$TMP/agent.log"
AGENT_PID=""

cleanup() {
    if [[ -n "$AGENT_PID" ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        # Bounded: a stuck agent gets KILL after about 5 s.
        for _ in $(seq 50); do
            kill -0 "$AGENT_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show() {
    # Print a command the way it would be typed, then run it.
    printf '\n$ %s\n' "$1"
}

echo "# starting an agent on loopback (state and root in $TMP)"
show "tether serve --port 0 --state-dir $TMP/state --root $TMP 2>$LOG &"
tether serve --port 0 --state-dir "$TMP/state" --root "$TMP" 2>"$LOG" &
AGENT_PID=$!

PORT=""
for _ in $(seq 100); do # up to ~10 s
    PORT=$(sed -n 's/^tether: listening on t[cl][ps] 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$LOG" | head -n 1)
    [[ -n "$PORT" ]] && break
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
        echo "demo: the agent exited before listening; its log:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.1
done
if [[ -z "$PORT" ]]; then
    echo "demo: the agent did not report a TCP port within 10 s; its log:" >&2
    cat "$LOG" >&2
    exit 1
fi
cat "$LOG"

HOST="127.0.0.1:$PORT"
# Pins of agent certificates go to a known_hosts of the demo's own: a later
# demo's agent may get the same port with a new certificate.
export XDG_CONFIG_HOME="$TMP/config"
TETHER_TOKEN=$(cat "$TMP/state/token")
export TETHER_TOKEN
echo "# the client reads the token from \$TETHER_TOKEN (here: $TMP/state/token)"

show "tether exec $HOST -- uname -a"
tether exec "$HOST" -- uname -a

show "tether exec $HOST --shell 'echo out; echo err >&2; exit 3'"
rc=0
tether exec "$HOST" --shell 'echo out; echo err >&2; exit 3' || rc=$?
echo "(exit code $rc)"
if [[ "$rc" -ne 3 ]]; then
    echo "demo: expected exit code 3, got $rc" >&2
    exit 1
fi

show "printf 'banana\\napple\\n' | tether exec $HOST -- sort"
printf 'banana\napple\n' | tether exec "$HOST" -- sort

show "tether echo $HOST '你好, tether'"
tether echo "$HOST" '你好, tether'

show "tether ping $HOST -c 3 -i 0.2"
tether ping "$HOST" -c 3 -i 0.2

echo
echo "# stopping the agent with SIGTERM"
kill -TERM "$AGENT_PID"
status=0
wait "$AGENT_PID" || status=$?
AGENT_PID=""
tail -n 1 "$LOG"
echo "(agent exit code $status)"
exit "$status"
