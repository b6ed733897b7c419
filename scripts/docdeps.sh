#!/usr/bin/env bash
# Python's and attrs' object inventories from Debian (python3-doc, python-attr-doc), so the
# documentation links to their references without a network (docs/conf.py looks for them).
# Without them the docs build all the same, warning-free, with those names as plain text; so
# this never fails: without root or apt it says what is missing and returns.
set -u
want=()
compgen -G '/usr/share/doc/python3*/html/objects.inv' >/dev/null || want+=(python3-doc)
[ -e /usr/share/doc/python-attr-doc/html/objects.inv ] || want+=(python-attr-doc)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "docdeps: missing ${want[*]} (not root or no apt-get); the docs link less" >&2
    exit 0
fi
echo "docdeps: installing ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${want[@]}"; } >/dev/null \
    || echo "docdeps: ${want[*]} not installed; the docs link less" >&2
exit 0
