#!/bin/sh
# Builds the Go compat program offline against Debian's amqp091-go (golang-github-rabbitmq-amqp091-go-dev):
# GOPATH mode, no module download. Output: tests/compat/go/bin/compat-go (gitignored).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/bin"
cd "$here"
GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= GOPROXY=off go build -o "$here/bin/compat-go" main.go
