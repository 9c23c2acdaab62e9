#!/usr/bin/env python3
"""Sorts a `perf` profile of the collector into the parts of its work.

The README's performance row "mimalloc 2.1.7 as the global allocator" was
made this way (issue 20):

    perf record -F 1999 --call-graph dwarf,16384 -o collector.data -p "$(pgrep -f 'fleetpatch collector' | head -1)" &
    target/release/fleetpatch bench --targets 0 --watchdogs 0 --create-targets 0 \
        --collector-targets 2000 --ceiling-messages 1000
    perf script -i collector.data -F comm,ip,sym,dso | scripts/collector-cpu-parts.py

Each sample goes to the first part whose rule matches its thread or one of
the functions on its call chain, so the more specific parts come first (the
batch and the relay run inside the runtime; the request's work inside hyper).
"""

import collections
import sys

# (part, thread name prefix or None, function name fragments)
PARTS = [
    ("relay: lapin's I/O thread", "lapin", ()),
    ("the intake's batch (sea-orm, sqlx, the PostgreSQL socket)", None,
     ("apply_reports", "run_batcher", "ReportIntake", "intake_statement")),
    ("relay: outbox claim and publish", None, ("outbox", "relay", "lapin", "hand_over_all", "publish")),
    ("key reads", None, ("KeyReader", "token_infos", "keys::")),
    ("auth: MAC, body hash, header, replay", None,
     ("report_auth", "verify", "Sha256", "sha2::", "hmac", "ReplayCache", "check_and_insert", "Authorization")),
    ("the request: body, protobuf, conversion, answer", None,
     ("post_reports", "ReportBatch", "convert", "ack_response")),
    ("HTTP: hyper, axum, the agents' sockets", None, ("hyper", "axum", "http::Connection", "runtime::http", "tower")),
    ("sqlx and sea-orm elsewhere (pool)", None, ("sqlx", "sea_orm", "postgres")),
    ("metrics, telemetry", None, ("metrics", "prometheus", "tracing")),
    ("the runtime: scheduling, parking, timers", None, ("tokio", "epoll", "schedule", "park")),
]


def part_of(thread, frames):
    for name, prefix, fragments in PARTS:
        if prefix is not None and thread.startswith(prefix):
            return name
        if any(fragment in frame for frame in frames for fragment in fragments):
            return name
    return "other"


def main():
    samples = collections.Counter()
    in_kernel = collections.Counter()
    thread, frames = None, []

    def flush():
        if thread is None:
            return
        part = part_of(thread, frames)
        samples[part] += 1
        if frames and "kernel.kallsyms" in frames[0]:
            in_kernel[part] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            thread, frames = None, []
        elif not line[0].isspace():
            thread, frames = line.split()[0], []
        else:
            fields = line.split(None, 1)
            if len(fields) == 2:
                frames.append(fields[1])
    flush()
    total = sum(samples.values())
    if total == 0:
        sys.exit("no samples on stdin: pipe `perf script -F comm,ip,sym,dso` of a profile with call chains")
    for part, count in samples.most_common():
        print(f"{100 * count / total:5.1f} %  (in the kernel {100 * in_kernel[part] / total:4.1f} %)  {part}")
    print(f"{total} samples")


if __name__ == "__main__":
    main()
