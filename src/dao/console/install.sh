#!/bin/sh
# Install dao on this host and bind it to your account at the dao console @CONSOLE@:
#
#   curl -fsSL @CONSOLE@/install.sh | sudo sh -s -- TOKEN
#
# It installs dao @VERSION@ into its own venv (/opt/dao, with dao on PATH), enrols the host with the one-time
# TOKEN (the identity goes to /etc/dao/agent.toml, mode 600), and starts the agent as a systemd service
# when systemd runs (else it says how to start it), and points the host's Docker at your accelerator address
# (dao mirror use) when the console has one for you. Run again, it upgrades dao in place and keeps the
# host's identity. With DAO_PREFIX=/some/dir every path is under that directory (and no service is
# installed), so the script can be tried without root. pip's own variables (PIP_INDEX_URL, ...) apply.
set -eu

CONSOLE="@CONSOLE@"
WHEEL="@WHEEL@"
TOKEN="${1:-}"
PREFIX="${DAO_PREFIX:-}"
VENV="$PREFIX/opt/dao"
BIN="$PREFIX/usr/local/bin"
CONFIG="$PREFIX/etc/dao/agent.toml"
UNIT="/etc/systemd/system/dao-agent.service"

say() { printf 'dao: %s\n' "$*"; }
fail() { printf 'dao: %s\n' "$*" >&2; exit 1; }

if [ -z "$PREFIX" ] && [ "$(id -u)" != 0 ]; then
    fail "run as root (curl ... | sudo sh -s -- TOKEN), or set DAO_PREFIX to install under a directory"
fi
command -v python3 >/dev/null 2>&1 || fail "python3 is needed: apt-get install python3 python3-venv"

fetch() {  # URL FILE
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL "$1" -o "$2"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say "fetching $WHEEL from $CONSOLE"
fetch "$CONSOLE/dist/$WHEEL" "$tmp/$WHEEL" || fail "cannot fetch $CONSOLE/dist/$WHEEL"

if [ ! -x "$VENV/bin/python" ]; then
    say "making the venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" || fail "cannot make a venv: apt-get install python3-venv"
fi
say "installing dao into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$tmp/$WHEEL" ||
    fail "pip could not install dao (it needs the package index for dao's dependencies)"
mkdir -p "$BIN"
ln -sf "$VENV/bin/dao" "$BIN/dao"

if [ -s "$CONFIG" ]; then
    say "this host is enrolled already ($CONFIG): keeping its identity"
elif [ -n "$TOKEN" ]; then
    "$VENV/bin/dao" agent enroll --console "$CONSOLE" --token "$TOKEN" --config "$CONFIG" ||
        fail "enrolment refused: make a new install command in the console (a token works once, for 24 h)"
else
    fail "give the enrolment token: curl -fsSL $CONSOLE/install.sh | sudo sh -s -- TOKEN"
fi
chmod 600 "$CONFIG"

if MIRROR=$("$VENV/bin/dao" agent mirror --config "$CONFIG" 2>/dev/null); then
    say "pointing this host's Docker, containerd and podman at your accelerator"
    "$VENV/bin/dao" mirror use "$MIRROR" \
        --docker-config "$PREFIX/etc/docker/daemon.json" --docker-pidfile "$PREFIX/var/run/docker.pid" \
        --containerd-certs "$PREFIX/etc/containerd/certs.d" --registries-conf "$PREFIX/etc/containers/registries.conf" ||
        say "could not: run  dao mirror use $MIRROR  yourself"
fi

if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    cat > "$UNIT" <<UNIT
[Unit]
Description=dao agent: this host's channel to the dao console
After=network-online.target docker.service
Wants=network-online.target

[Service]
ExecStart=$VENV/bin/dao agent run --config $CONFIG
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable dao-agent.service >/dev/null 2>&1
    systemctl restart dao-agent.service
    say "the agent runs as the systemd service dao-agent (journalctl -u dao-agent)"
else
    say "no systemd here: start the agent with  $BIN/dao agent run --config $CONFIG"
fi
"$VENV/bin/dao" --version
