#!/usr/bin/env bash
# `make setup` runs this: the report test (tests/test_bench.py::test_report_html_in_chromium) opens
# report.html in Debian's headless Chromium. Install it when it is missing and we may (root, apt-get);
# otherwise say how, and go on: the test then skips, naming the package. Never fails the set-up.
set -u
for b in chromium chromium-browser google-chrome; do
  command -v "$b" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium for the report test (apt-get, a minute or two)"
  export DEBIAN_FRONTEND=noninteractive
  if timeout 600 apt-get update -qq >/dev/null 2>&1 \
     && timeout 900 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    echo "setup: chromium $(chromium --version 2>/dev/null | awk '{print $2}') installed"
    exit 0
  fi
  echo "setup: could not install chromium with apt-get; the report test will skip" >&2
  exit 0
fi
echo "setup: chromium is not installed and this is not a root Debian shell; the report test will skip" \
     "(install it with: apt-get install -y chromium)" >&2
exit 0
