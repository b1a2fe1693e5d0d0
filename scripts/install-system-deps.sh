#!/usr/bin/env bash
# Install the system packages the tests need, only when missing (Debian/Ubuntu, run as root or
# with sudo). Each missing tool is named; nothing is installed when everything is present.
set -euo pipefail

need=()
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
{ command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; } || need+=(openssh-server)
command -v socat >/dev/null 2>&1 || need+=(socat)
# Browser-login tests drive Debian's Chromium with Playwright (its own browser download does
# not work on these machines).
[ -x /usr/bin/chromium ] || need+=(chromium)
# Scale-out tests run three relays sharing state in a real Redis.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The audit store's PostgreSQL backend is tested against a real server (tests/postgres_fixture.py
# runs Debian's server binaries in a temporary directory on a loopback port).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
# deploy/haproxy/haproxy.cfg is checked (`haproxy -c`) and run in front of two relays.
{ command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || need+=(haproxy)
# PROXY protocol towards targets: nginx in stream mode reads the relay's header (the stream
# module is a separate package in Debian).
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
# Corporate-proxy tests: the client reaches the relay and the IdP only through a real HTTP
# CONNECT proxy (with and without Basic authentication).
{ command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ]; } || need+=(tinyproxy)
# ... and through a real SOCKS5 proxy.
command -v microsocks >/dev/null 2>&1 || need+=(microsocks)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${need[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
