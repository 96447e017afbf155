"""Process set-up shared by every service (services.common.server)."""

from __future__ import annotations

import subprocess
import sys

# Builds a 1 MB message the way nats-py does (the payload concatenated twice) 200 times, and
# prints the page faults per message; with `prepare` first, as every service process starts.
_FAULTS = """
import os, resource, sys
if sys.argv[1] == "prepare":
    from services.common.server import prepare_process
    from services.common.settings import ServiceSettings
    prepare_process(ServiceSettings())
payload = os.urandom(1_000_000)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def send():  # built, sent and dropped, as each message is
    message = b"PUB s 1000000\\r\\n" + payload + b"\\r\\n"
    del message
for _ in range(10):
    send()
before = faults()
for _ in range(200):
    send()
print((faults() - before) / 200)
"""


def _faults_per_message(mode: str) -> float:
    answer = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return float(answer.stdout)


def test_a_service_process_reuses_large_blocks_instead_of_faulting_their_pages_in_again():
    assert _faults_per_message("plain") > 100  # glibc's default: a fresh mmap per block
    assert _faults_per_message("prepare") < 10
