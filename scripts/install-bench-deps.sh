#!/usr/bin/env bash
# System packages `make bench` uses, installed only when missing (Debian/Ubuntu, run as root or
# with sudo): iperf3 (source and sink), socat (the C relay baseline), taskset (util-linux, for
# pinning), nginx (the HTTP-mode upstream and the C reverse-proxy baseline, run as a
# loopback process, never as the system service) and wrk (the HTTP load generator). The gcloud
# CLI is optional: its rows are skipped when it is not installed.
set -euo pipefail

need=()
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages for the benchmarks: ${need[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
