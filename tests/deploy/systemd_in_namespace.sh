#!/bin/bash
# The units under a real systemd: a private systemd (PID 1 of new pid, mount and cgroup
# namespaces, only our units, no generators, /proc/sys read-only) runs meshlet-sidecar@web
# as `meshlet install systemd` writes it (DynamicUser, LoadCredential, the whole sandbox)
# against `meshlet dev` with ACLs on, and web.service with the app drop-in. Checks: READY and
# STATUS, the dynamic user, no capability, the token read from the credential, the app
# started after READY=1, the watchdog pinged past WatchdogSec with no restart, reload, stop
# order (app first) with a clean drain, and an invalid file failing with status 2 and no
# restart. Exits non-zero on the first failed check.
#
#   sudo tests/deploy/systemd_in_namespace.sh /opt/meshlet/venv/bin/meshlet WORKDIR
#
# Needs root, unshare(1), systemd, a cgroup2 hierarchy (/sys/fs/cgroup or, on hybrid hosts,
# /sys/fs/cgroup/unified), and a meshlet whose interpreter is not under /root or /home
# (ProtectHome=yes hides those) nor under /tmp (PrivateTmp=yes).
# tests/deploy/test_real_systemd.py runs it when MESHLET_REAL_SYSTEMD is set.
set -euo pipefail

if [ "${1:-}" = --inner ]; then
    # PID 1 of the new namespaces: a private view for systemd, then exec it.
    W=$2
    mount --make-rprivate /
    mount -t cgroup2 none /sys/fs/cgroup
    mount -t tmpfs tmpfs /run
    mkdir -p "$W/etc-upper" "$W/etc-work"
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$W/etc-upper,workdir=$W/etc-work" /etc
    rm -rf /etc/systemd/system && mkdir -p /etc/systemd/system /etc/meshlet
    cp -a "$W/units/." /etc/systemd/system/
    cp -a "$W/root/etc/meshlet/." /etc/meshlet/
    mount -t tmpfs tmpfs /usr/lib/systemd/system
    for t in sysinit basic multi-user network-online shutdown default; do
        printf '[Unit]\nDescription=%s (test)\n' "$t" > "/usr/lib/systemd/system/$t.target"
    done
    printf '[Unit]\nDescription=System Slice\nDefaultDependencies=no\n' \
        > /usr/lib/systemd/system/system.slice
    mount -t tmpfs tmpfs /usr/lib/systemd/system-generators
    mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
    # systemd hands LoadCredential= mounts to units by propagation: shared, as on a booted host.
    mount --make-rshared /
    export container=meshlet-test
    exec /lib/systemd/systemd --system --unit=meshlet-test.target \
        --default-standard-output=inherit --default-standard-error=inherit
fi

MESHLET=$1
W=$2
SELF=$(readlink -f "$0")
TOKEN=2b0c1d5e-6a7f-4e8d-9c3b-0a1b2c3d4e5f
CG=/sys/fs/cgroup
[ -e "$CG/cgroup.procs" ] || CG=/sys/fs/cgroup/unified
CG=$CG/meshlet-systemd-test-$$
DEV_PID="" UNSHARE_PID="" SYSTEMD_PID=""

fail() { echo "FAIL: $*" >&2; exit 1; }
in_ns() { timeout 60 nsenter -t "$SYSTEMD_PID" -m -p -- "$@"; }
prop() { in_ns systemctl show -p "$2" --value "$1"; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
cleanup() {
    if [ -n "$SYSTEMD_PID" ] && kill -0 "$SYSTEMD_PID" 2>/dev/null; then
        kill -s RTMIN+14 "$SYSTEMD_PID"  # immediate power-off: the namespace's processes end
        for _ in $(seq 30); do kill -0 "$SYSTEMD_PID" 2>/dev/null || break; sleep 0.5; done
    fi
    [ -n "$DEV_PID" ] && kill "$DEV_PID" 2>/dev/null || true
    [ -d "$CG" ] && find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$W" && mkdir -p "$W/units"
DEV=$(free_port) SIDE=$(free_port) ADMIN=$(free_port) APP=$(free_port)
"$MESHLET" dev --http-addr "127.0.0.1:$DEV" --acl-initial-management-token "$TOKEN" \
    --acl-default-policy deny > "$W/dev.log" 2>&1 &
DEV_PID=$!
printf '%s' "$TOKEN" > "$W/token"
"$MESHLET" install systemd --service web --root "$W/root" --consul-token-file "$W/token" \
    --address 127.0.0.1 --port "$APP" --app-unit web.service > "$W/install.log"
sed -i -e "s/^  address: 127.0.0.1:8500$/  address: 127.0.0.1:$DEV/" \
    -e "s/^  port: 21000$/  port: $SIDE/" -e "s/^  address: 127.0.0.1:19000$/  address: 127.0.0.1:$ADMIN/" \
    -e "s/^  drain_period: 10s$/  drain_period: 2s/" "$W/root/etc/meshlet/web.yaml"
"$MESHLET" sidecar --check-config -c "$W/root/etc/meshlet/web.yaml" > /dev/null
cp -a "$W/root/etc/systemd/system/." "$W/units/"
printf '[Unit]\nDescription=web app\n[Service]\nDynamicUser=yes\nExecStart=/usr/bin/python3 -m http.server %s --bind 127.0.0.1\n' \
    "$APP" > "$W/units/web.service"
printf '[Unit]\nDescription=meshlet test\nWants=web.service\n' > "$W/units/meshlet-test.target"
# Test-only: the service's output to a file (no journald in the namespace).
mkdir -p "$W/units/meshlet-sidecar@web.service.d"
printf '[Service]\nStandardOutput=append:/run/web.log\nStandardError=append:/run/web.log\n' \
    > "$W/units/meshlet-sidecar@web.service.d/99-test-log.conf"

mkdir "$CG"
( echo "$BASHPID" > "$CG/cgroup.procs"
  exec unshare --pid --fork --mount --mount-proc --cgroup --propagation private \
      "$SELF" --inner "$W" ) > "$W/systemd.log" 2>&1 &
UNSHARE_PID=$!
for _ in $(seq 100); do
    SYSTEMD_PID=$(ps --ppid "$UNSHARE_PID" -o pid= | tr -d ' ') && [ -n "$SYSTEMD_PID" ] && break
    sleep 0.2
done
[ -n "$SYSTEMD_PID" ] || fail "systemd did not start"
for _ in $(seq 120); do
    [ "$(prop web.service ActiveState 2>/dev/null || true)" = active ] && break
    sleep 0.5
done
[ "$(prop web.service ActiveState)" = active ] || {
    in_ns systemctl status meshlet-sidecar@web.service --no-pager || true
    in_ns tail -20 /run/web.log || true
    fail "web.service did not start"
}

S=meshlet-sidecar@web.service
MAIN=$(prop $S MainPID)
[[ "$(prop $S StatusText)" == "ready, 0 upstreams" ]] || fail "STATUS= is '$(prop $S StatusText)'"
[ "$(prop $S User)" = meshlet-web ] || fail "dynamic user is $(prop $S User)"
in_ns grep -q "^CapEff:[[:space:]]*0000000000000000$" "/proc/$MAIN/status" || fail "capabilities"
in_ns grep -q "^NoNewPrivs:[[:space:]]*1$" "/proc/$MAIN/status" || fail "NoNewPrivs"
in_ns grep -q "^Seccomp:[[:space:]]*2$" "/proc/$MAIN/status" || fail "seccomp filter"
in_ns sh -c "tr '\0' '\n' < /proc/$MAIN/environ" | grep -qx \
    "CONSUL_HTTP_TOKEN_FILE=/run/credentials/$S/consul-token" || fail "token file variable"
in_ns grep -q "registered web and web-sidecar-proxy with Consul" /run/web.log \
    || fail "not registered (ACLs deny without the credential's token)"
READY_AT=$(prop $S ActiveEnterTimestampMonotonic)
APP_AT=$(prop web.service ExecMainStartTimestampMonotonic)
[ "$APP_AT" -ge "$READY_AT" ] || fail "web.service started before its sidecar's READY=1"

# Past WatchdogSec=20s: pinged, never restarted.
sleep 25
[ "$(prop $S NRestarts)" = 0 ] || fail "restarted $(prop $S NRestarts) times (watchdog?)"
[ "$(prop $S WatchdogTimestampMonotonic)" -gt "$READY_AT" ] || fail "no WATCHDOG=1 recorded"
[ "$(prop $S ActiveState)" = active ] || fail "not active after WatchdogSec"

in_ns systemctl reload $S || fail "reload"
in_ns grep -q "reloaded /etc/meshlet/web.yaml" /run/web.log || fail "no reload in the log"

in_ns systemctl stop $S   # Requires=: the app stops too, and first (After= reversed)
[ "$(prop web.service ActiveState)" = inactive ] || fail "web.service still running"
[ "$(prop web.service InactiveEnterTimestampMonotonic)" -le "$(prop $S ActiveExitTimestampMonotonic)" ] \
    || fail "the sidecar began stopping before the app had stopped"
[ "$(prop $S Result)/$(prop $S ExecMainStatus)" = success/0 ] || fail "unclean stop"
in_ns grep -q "deregistered; draining for 2s" /run/web.log || fail "no drain"

# An invalid file (loopback listener, routable service): status 2, no restart.
in_ns sed -i "/^service:/,/^sidecar:/s/^  address: 127.0.0.1$/  address: 10.0.0.5/" \
    /etc/meshlet/web.yaml
in_ns systemctl reset-failed
in_ns systemctl start $S 2>/dev/null && fail "started with an invalid file"
sleep 3
[ "$(prop $S ExecMainStatus)/$(prop $S NRestarts)/$(prop $S ActiveState)" = 2/0/failed ] \
    || fail "invalid file: $(prop $S ExecMainStatus)/$(prop $S NRestarts)/$(prop $S ActiveState)"
in_ns grep -q "sidecar.address: the sidecar's public listener is bound to loopback" /run/web.log \
    || fail "no key-naming error"
echo "OK: meshlet-sidecar@web.service under systemd $(systemctl --version | head -1 | cut -d' ' -f2)"
