#!/usr/bin/env bash
# Builds the Java compatibility driver (tests/compat/java/Compat.java) against Debian's RabbitMQ Java
# client into tests/compat/java/build/ (gitignored). Idempotent: recompiles only when a source is newer
# than the build. No Maven: the jars come from the Debian packages librabbitmq-client-java and
# libslf4j-java (its dependency), under /usr/share/java.
#
# Missing tools: as root with apt-get, installs them; otherwise prints one line and exits 0 (1 if CI=true),
# and tests/compat/test_java.py skips (fails under CI=true) with the same reason.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/java"
build="$src/build"
jars=/usr/share/java
client_jar="$jars/amqp-client.jar"

missing() {
    local what=""
    command -v javac >/dev/null 2>&1 || what="javac (JDK)"
    [[ -f "$client_jar" ]] || what="${what:+$what, }$client_jar (librabbitmq-client-java)"
    [[ -f "$jars/slf4j-api.jar" ]] || what="${what:+$what, }$jars/slf4j-api.jar (libslf4j-java)"
    echo "$what"
}

if [[ -n "$(missing)" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "java compat: installing librabbitmq-client-java default-jdk-headless"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq librabbitmq-client-java default-jdk-headless
    fi
fi
if [[ -n "$(missing)" ]]; then
    echo "java compat: SKIP: missing $(missing); install: apt-get install librabbitmq-client-java default-jdk-headless"
    [[ "${CI:-}" == "true" ]] && exit 1
    exit 0
fi

stamp="$build/Compat.class"
if [[ -f "$stamp" && -z "$(find "$src" -maxdepth 1 -name '*.java' -newer "$stamp")" ]]; then
    exit 0
fi
mkdir -p "$build"
javac -encoding UTF-8 -Xlint:all -Werror -cp "$client_jar" -d "$build" "$src"/*.java
echo "java compat: built $build"
