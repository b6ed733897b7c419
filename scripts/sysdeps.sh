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
# Python's and attrs' object inventories, so the docs link to them offline (docs/conf.py). Kept
# apart from the tools above: without them the docs still build, only with fewer links.
docs=()
compgen -G '/usr/share/doc/python3*/html/objects.inv' >/dev/null || docs+=(python3-doc)
[ -e /usr/share/doc/python-attr-doc/html/objects.inv ] || docs+=(python-attr-doc)
[ ${#want[@]} -eq 0 ] && [ ${#docs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "sysdeps: missing ${want[*]} ${docs[*]} (not root or no apt-get); tests needing them will skip" >&2
    exit 0
fi
echo "sysdeps: installing ${want[*]} ${docs[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || exit 0
[ ${#want[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
[ ${#docs[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${docs[@]}" >/dev/null \
    || echo "sysdeps: ${docs[*]} not installed; the docs link less to Python's own" >&2
