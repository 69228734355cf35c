#!/usr/bin/env bash
# Build the jwt-proxy image and smoke-test it, as a user of the image would run it.
#
#   sudo conf/container-test.sh        (from anywhere; needs root, takes minutes)
#
# Uses docker when its daemon answers, podman otherwise (installed with apt-get when
# missing). When the python:3.11-slim base cannot be pulled (no registry in reach), it
# makes a local one under that tag: a Debian bookworm rootfs (debootstrap) with python3,
# python3-pip, python3-venv and ca-certificates, imported into the engine.
#
# The smoke test runs everything on the host network, on loopback: `jwt-proxy demo` from
# the image plays STS (local-sts) and the upstream (an echo that verifies the bearer JWT
# against local-sts's JWKS); the image under test runs with a read-only root and a tmpfs
# on /tmp, pinned to the echo. Checked: a proxied request reaches the echo with a verified
# token; /readyz answers 200; the image's HEALTHCHECK passes; the process is not root;
# no compiler is in the image; `stop` ends it within the graceful timeout, exit code 0.
#
# Environment: ENGINE (docker or podman), IMAGE (tag to build, default jwt-proxy:smoke),
# PORT_BASE (default 18080: six ports from it are used), DEBIAN_MIRROR.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-jwt-proxy:smoke}
BASE_IMAGE=$(awk '/^FROM /{print $2; exit}' "$REPO/Dockerfile")
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PORT_BASE=${PORT_BASE:-18080}
PROXY_PORT=$PORT_BASE
UPSTREAM_PORT=$((PORT_BASE + 1))
DEMO_PROXY_PORT=$((PORT_BASE + 2))
METRICS_PORT=$((PORT_BASE + 10))
DEMO_METRICS_PORT=$((PORT_BASE + 12))
STS_PORT=$((PORT_BASE + 519))
GRACEFUL_TIMEOUT_S=10
AUDIENCE=https://demo.jwt-proxy.local
PROXY_NAME=jwt-proxy-smoke
DEMO_NAME=jwt-proxy-smoke-demo
START_TIMEOUT_S=60

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

choose_engine() {
    if [ -n "${ENGINE:-}" ]; then
        return
    fi
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
        return
    fi
    if ! command -v podman >/dev/null 2>&1; then
        say "no docker daemon and no podman: installing podman, debootstrap and runc"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap runc >/dev/null
    fi
    ENGINE=podman
}

# Flags for `build` and `run` that this engine needs here. podman: chroot isolation and
# runc work inside a sandbox that denies what crun and user namespaces need; the host
# network avoids netavark/iptables; explicit ulimits, at most what this shell has and a
# modest process count, because runc may not raise a limit to podman's defaults (and
# fails to start the container if it tries); docker format keeps HEALTHCHECK (OCI images
# drop it).
engine_flags() {
    if [ "$ENGINE" = podman ]; then
        local files
        files=$(ulimit -Hn)
        if [ "$files" = unlimited ] || [ "$files" -gt 65536 ]; then
            files=65536
        fi
        BUILD_FLAGS=(--format docker --isolation=chroot --network host)
        RUN_FLAGS=(--runtime runc --network host --ulimit "nofile=$files:$files" --ulimit nproc=4096:4096)
    else
        BUILD_FLAGS=(--network host)
        RUN_FLAGS=(--network host)
    fi
}

image_exists() {
    "$ENGINE" image inspect "$1" >/dev/null 2>&1
}

make_local_base() {
    command -v debootstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    local rootfs
    rootfs=$(mktemp -d /var/tmp/jwt-proxy-base.XXXXXX)
    say "making $BASE_IMAGE locally: debootstrap bookworm from $DEBIAN_MIRROR into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; fail "debootstrap"; }
    # A host behind a TLS-inspecting egress proxy trusts extra CAs; pip in the build
    # stage must trust them too. The official image needs nothing of the kind.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    fi
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | "$ENGINE" import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null 2>&1
    rm -rf "$rootfs" "$rootfs.log"
}

ensure_base() {
    if image_exists "$BASE_IMAGE"; then
        say "base $BASE_IMAGE: present"
    elif timeout 120 "$ENGINE" pull "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base $BASE_IMAGE: pulled"
    else
        say "base $BASE_IMAGE: registry out of reach"
        make_local_base
    fi
}

cleanup() {
    local name
    for name in "$PROXY_NAME" "$DEMO_NAME"; do
        "$ENGINE" rm -f "$name" >/dev/null 2>&1 || true
    done
}

wait_for_http() {  # url, expected status
    local deadline=$((SECONDS + START_TIMEOUT_S)) status
    while [ $SECONDS -lt $deadline ]; do
        status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)
        [ "$status" = "$2" ] && return 0
        sleep 0.5
    done
    return 1
}

proxy_logs() {
    "$ENGINE" logs "$PROXY_NAME" 2>&1 | tail -20 >&2 || true
}

main() {
    choose_engine
    engine_flags
    command -v curl >/dev/null 2>&1 || fail "curl is needed on the host"
    say "engine: $ENGINE ($("$ENGINE" --version))"
    trap cleanup EXIT
    cleanup

    if command -v hadolint >/dev/null 2>&1; then
        hadolint "$REPO/Dockerfile" && say "hadolint: clean"
    fi

    ensure_base
    say "building $IMAGE"
    local started=$SECONDS
    "$ENGINE" build "${BUILD_FLAGS[@]}" -t "$IMAGE" "$REPO" >/tmp/jwt-proxy-build.log 2>&1 \
        || { tail -30 /tmp/jwt-proxy-build.log; fail "build (log: /tmp/jwt-proxy-build.log)"; }
    say "built in $((SECONDS - started))s; size: $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}')"
    say "healthcheck in the image: $("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")"

    say "local-sts on 127.0.0.1:$STS_PORT and the verifying echo upstream on 127.0.0.1:$UPSTREAM_PORT (jwt-proxy demo)"
    "$ENGINE" run -d --name "$DEMO_NAME" "${RUN_FLAGS[@]}" --no-healthcheck "$IMAGE" demo \
        --sts-listen-addr "127.0.0.1:$STS_PORT" --upstream-listen-addr "127.0.0.1:$UPSTREAM_PORT" \
        --listen-addr "127.0.0.1:$DEMO_PROXY_PORT" --metrics-listen-addr "127.0.0.1:$DEMO_METRICS_PORT" >/dev/null
    wait_for_http "http://127.0.0.1:$STS_PORT/.well-known/jwks.json" 200 \
        || { "$ENGINE" logs "$DEMO_NAME" >&2; fail "local-sts did not start"; }

    # Without systemd, podman logs that it cannot schedule the HEALTHCHECK's timer;
    # `podman healthcheck run` below runs the check on demand instead.
    say "the image under test: read-only root, tmpfs on /tmp, pinned to the echo upstream"
    "$ENGINE" run -d --name "$PROXY_NAME" "${RUN_FLAGS[@]}" --read-only --tmpfs /tmp \
        -e AWS_REGION=us-east-1 -e AWS_ACCESS_KEY_ID=AKIASMOKETEST -e AWS_SECRET_ACCESS_KEY=smoke-test \
        -e AWS_ENDPOINT_URL_STS="http://127.0.0.1:$STS_PORT" \
        -e LISTEN_ADDR="127.0.0.1:$PROXY_PORT" -e METRICS_LISTEN_ADDR="127.0.0.1:$METRICS_PORT" \
        -e UPSTREAM_HOST="127.0.0.1:$UPSTREAM_PORT" -e UPSTREAM_SCHEME=http -e TOKEN_AUDIENCE="$AUDIENCE" \
        -e GRACEFUL_TIMEOUT="${GRACEFUL_TIMEOUT_S}s" "$IMAGE" >/dev/null

    wait_for_http "http://127.0.0.1:$METRICS_PORT/readyz" 200 || { proxy_logs; fail "/readyz never answered 200"; }
    say "PASS /readyz: 200"

    local answer
    answer=$(curl -s --max-time 10 -w '\n%{http_code} %{time_total}s' -H 'Authorization: Bearer my-old-api-key' \
        "http://127.0.0.1:$PROXY_PORT/hello") || { proxy_logs; fail "proxied request"; }
    case "$answer" in
        *'"aud": "'"$AUDIENCE"'"'*'Bearer <redacted,'*$'\n200 '*) say "PASS proxied request: $(tail -1 <<<"$answer"), the echo verified the JWT (aud $AUDIENCE, signed by local-sts)" ;;
        *) proxy_logs; printf '%s\n' "$answer" >&2; fail "the proxied request did not reach the echo with a verified token" ;;
    esac
    case "$answer" in
        *my-old-api-key*) fail "the client's own credential reached the upstream" ;;
    esac

    "$ENGINE" exec "$PROXY_NAME" jwt-proxy healthcheck || fail "jwt-proxy healthcheck in the container"
    say "PASS jwt-proxy healthcheck (exec): exit 0"
    if [ "$ENGINE" = podman ]; then
        podman healthcheck run "$PROXY_NAME" || fail "podman healthcheck run"
        say "PASS HEALTHCHECK: $(podman inspect --format '{{.State.Health.Status}}' "$PROXY_NAME")"
    else
        local deadline=$((SECONDS + START_TIMEOUT_S)) health=starting
        while [ "$health" != healthy ] && [ $SECONDS -lt $deadline ]; do
            sleep 1
            health=$(docker inspect --format '{{.State.Health.Status}}' "$PROXY_NAME")
        done
        [ "$health" = healthy ] || fail "HEALTHCHECK: $health"
        say "PASS HEALTHCHECK: healthy"
    fi

    local uid
    uid=$("$ENGINE" exec "$PROXY_NAME" id -u)
    [ "$uid" != 0 ] || fail "the proxy runs as root"
    say "PASS non-root: uid $uid"
    if "$ENGINE" exec "$PROXY_NAME" sh -c 'command -v gcc cc make' >/dev/null 2>&1; then
        fail "build tools in the image"
    fi
    say "PASS no gcc, cc or make in the image"

    local before after code
    before=$(date +%s.%N)
    "$ENGINE" stop -t $((GRACEFUL_TIMEOUT_S + 5)) "$PROXY_NAME" >/dev/null
    after=$(date +%s.%N)
    code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$PROXY_NAME")
    local took
    took=$(awk -v a="$before" -v b="$after" 'BEGIN{printf "%.1f", b-a}')
    [ "$code" = 0 ] || { proxy_logs; fail "exit code $code after stop"; }
    awk -v t="$took" -v g="$GRACEFUL_TIMEOUT_S" 'BEGIN{exit !(t < g)}' || fail "stop took ${took}s (graceful timeout ${GRACEFUL_TIMEOUT_S}s)"
    say "PASS stop: exit code 0 in ${took}s (graceful timeout ${GRACEFUL_TIMEOUT_S}s)"
    say "all checks passed; image $IMAGE, $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.1f MB", $1/1e6}')"
}

main "$@"
