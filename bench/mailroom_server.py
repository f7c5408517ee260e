"""A throwaway Mailroom server for the Python benchmarks: free ports, a temporary data dir, and the
broker's CPU seconds."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    """A TCP port nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_port(port, proc):
    """Waits until `port` accepts connections; exits if the server died first."""
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"mailroom exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on {port}")


@contextlib.contextmanager
def mailroom(binary, prefix):
    """Runs `binary server` on free AMQP, HTTP and Prometheus ports until the block ends; yields
    (process, amqp_port, http_port, prometheus_port) once all three listen."""
    amqp, api_port, prom = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix=prefix) as data:
        proc = subprocess.Popen([binary, "server", "--amqp-listen", f"127.0.0.1:{amqp}", "--http-listen",
                                 f"127.0.0.1:{api_port}", "--prometheus-listen", f"127.0.0.1:{prom}",
                                 "--data-dir", data, "--log-level", "warn"], stdout=subprocess.DEVNULL)
        try:
            for port in (amqp, api_port, prom):
                wait_port(port, proc)
            yield proc, amqp, api_port, prom
        finally:
            proc.terminate()
            proc.wait(timeout=30)
