#!/bin/sh
# A shell script as operators write them with the C client's amqp-tools (librabbitmq): declare a queue,
# publish from arguments and from stdin line by line, take one with amqp-get, drain the rest with
# amqp-consume, then delete the queue. Each step prints a tagged line that tests/compat/test_amqp_tools.py
# checks. Usage: pipeline.sh <url> <queue>
set -eu
url=$1
q=$2
echo "declared: $(amqp-declare-queue -u "$url" -q "$q" -d)"
amqp-publish -u "$url" -r "$q" -p -C text/plain -H "x-step: one" -b "first"
printf 'second\nthird\nfourth\n' | amqp-publish -u "$url" -r "$q" -l
echo "got: $(amqp-get -u "$url" -q "$q")"
# One line per message: amqp-consume runs the command once per delivery with the body on stdin.
amqp-consume -u "$url" -q "$q" -c 3 -p 1 -- sh -c 'printf "consumed: %s\n" "$(cat)"'
set +e
amqp-get -u "$url" -q "$q" >/dev/null 2>&1
echo "empty get exit: $?"
set -e
echo "deleted with: $(amqp-delete-queue -u "$url" -q "$q")"
set +e
amqp-get -u "$url" -q "$q" 2>&1
echo "missing get exit: $?"
