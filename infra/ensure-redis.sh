#!/usr/bin/env bash
# The Redis store's tests talk to a real redis-server (the tests start their own on a free loopback
# port). Install Debian's package when the machine lacks it; do nothing when it is there.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (Debian package) for the Redis store tests" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
else
  echo "redis-server is missing and cannot be installed here: install it (apt-get install redis-server)" >&2
  exit 1
fi
