#!/bin/sh
# Install wrk (Debian package) if it is missing and we are root; otherwise say that the
# benchmarks will fall back to the aiohttp load client. Never fails.
if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing wrk (apt-get install -y wrk)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 || \
       { apt-get update -qq >/dev/null 2>&1 && \
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1; }; then
        exit 0
    fi
fi
echo "bench: wrk is not installed and cannot be installed here: using the aiohttp load client"
exit 0
