#!/usr/bin/env bash
# Installs the Debian packages that the test suite and the demo use, when they are missing.
# Without root or apt it only says what is missing: the tests that need those tools then skip
# with a reason (and fail instead under KEEPCONN_REQUIRE_NETNS=1, as in CI).
set -u
want=()
command -v ip >/dev/null 2>&1 || want+=(iproute2)
command -v tc >/dev/null 2>&1 || want+=(iproute2)
command -v mosquitto_pub >/dev/null 2>&1 || want+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || want+=(openssl)
command -v mosquitto >/dev/null 2>&1 && [ -x "$(command -v mosquitto)" ] || want+=(mosquitto)
# The cluster tests and `make demo-cluster` start throwaway redis-servers (keepconn.testing.RedisServer).
command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "sysdeps: missing ${want[*]} (not root or no apt-get); tests needing them will skip" >&2
    exit 0
fi
echo "sysdeps: installing ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
