#!/usr/bin/env bash
# The system packages the test suite uses, installed from Debian/Ubuntu packages when missing
# (as root, or through sudo). Run it once before the tests; the tests fail, naming this script,
# when one is missing. Installs nothing, and needs no network, when all are there.
#
#   curl                     the demo walkthrough's commands (tests/test_demo.py)
#   nginx                    the nginx forward-auth recipe (tests/test_deploy.py)
#   openjdk-17-jdk-headless  javac/java for the servlet containers (tests/test_paths.py)
#   libtomcat10-java         Tomcat's classes             (tests/test_paths.py)
#   libjetty9-java           Jetty's classes              (tests/test_paths.py)
#   nodejs (>= 20)           the mini-program client's tests (tests/test_js_client.py)
set -euo pipefail

missing=()
has() { command -v "$1" >/dev/null 2>&1; }

has curl || missing+=(curl)
has nginx || [ -x /usr/sbin/nginx ] || missing+=(nginx)
has javac || missing+=(openjdk-17-jdk-headless)
[ -e /usr/share/java/tomcat10-catalina.jar ] || missing+=(libtomcat10-java)
[ -e /usr/share/java/jetty9-server.jar ] || missing+=(libjetty9-java)
has node || missing+=(nodejs)

if [ ${#missing[@]} -gt 0 ]; then
    echo "system-packages: installing ${missing[*]}" >&2
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif has sudo; then
        sudo=(sudo)
    else
        echo "system-packages: not root and no sudo: install ${missing[*]} (apt-get install" \
             "--no-install-recommends ${missing[*]})" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Debian's own nodejs may be older than the client's tests need.
major=$(node --version | sed -E 's/^v([0-9]+).*/\1/')
if [ "$major" -lt 20 ]; then
    echo "system-packages: node $(node --version) is too old: the mini-program client's tests" \
         "need Node.js >= 20 (e.g. from https://nodejs.org or NodeSource)" >&2
    exit 1
fi
echo "system-packages: curl, nginx, a JDK, Tomcat, Jetty and Node.js $(node --version) present" >&2
