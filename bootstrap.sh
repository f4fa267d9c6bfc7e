#!/usr/bin/env bash
# One-command set-up for ipop-switch on Debian 12, as root.
#   ./bootstrap.sh demo   install everything, then run the lab demo (the main job)
#   ./bootstrap.sh test   install everything, then run the whole test suite
#   ./bootstrap.sh install  only install
# Safe to run twice: apt-get and pip skip what is already there.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${1:-}"
shift || true

die() { echo "bootstrap: $*" >&2; exit 1; }

case "$MODE" in
  demo|test|install) ;;
  *) die "usage: ./bootstrap.sh demo|test|install [args...]" ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian packages and builds network namespaces); become root (su -, or sudo where installed) and run $0 $MODE again"

APT_PKGS=(openvswitch-switch prosody coturn nftables conntrack iproute2 iperf3 iputils-ping tcpdump procps psmisc ca-certificates openssl python3 python3-venv dnsmasq-base ruby ethtool
          gcc libc6-dev python3-dev libssl-dev    # these four build the datapath's C loops
          clang libclang-rt-14-dev                # the C loops under libFuzzer + ASan/UBSan (bench --fuzz)
          nebula openvpn n2n                      # bench peers, so CI sets each up (tests/test_bench_smoke.py)
          chromium fonts-dejavu-core              # the overlay view's page tested in a real browser (tests/test_web_lab.py)
          bind9-dnsutils                          # dig: the demo tells how to ask a node's DNS responder
          ejabberd)                               # the lab's XMPP cluster (lab up --xmpp ejabberd; tests/test_xmpp_cluster_lab.py)

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  # Keep the packages' own system services from starting: the lab runs
  # private instances of OVS, Prosody, ejabberd and coturn inside namespaces.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  trap '[ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Python: a virtual environment of our own, so Debian's Python stays untouched
# (PEP 668) and a second run reuses it.
PY="${PYTHON:-python3}"
VENV="${IPSW_VENV:-$HERE/.venv}"   # IPSW_VENV: e.g. when several VMs share one checkout
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || die "could not create a virtual environment with $PY"
fi
stamp="$VENV/.installed-$(cat "$HERE/pyproject.toml" "$HERE/setup.py" "$HERE/ipop_switch/tunnel/_fastpath.c" "$HERE/ipop_switch/tunnel/_recvmany.h" | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$HERE[test]"
  touch "$stamp"
fi

export PATH="$VENV/bin:$PATH"
cd "$HERE"
case "$MODE" in
  install) echo "bootstrap: installed; run $VENV/bin/ipop-switch --help" ;;
  demo) exec "$VENV/bin/ipop-switch" lab demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
esac
