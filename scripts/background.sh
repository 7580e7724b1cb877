#!/usr/bin/env bash
# Runs a long experiment in the background at the lowest CPU priority, appending its output to
# LOG, so that the test suite or a timing run beside it gets the CPU:
#   bash scripts/background.sh ~/runs/study.log python experiments/compare_methods.py ...
# `nice` alone does not do it on Linux with autogroup scheduling (the default): a new session
# (setsid, a new terminal) gets its own group, and nice only ranks processes within a group, so a
# niced job in its own session still takes half the CPU. The group's own nice value is set too.
set -euo pipefail
log=$1; shift
cd "$(dirname "$0")/.."
setsid bash -c 'if [ -w /proc/self/autogroup ]; then echo 19 > /proc/self/autogroup; fi
                exec nice -n 19 "$@"' background "$@" >> "$log" 2>&1 < /dev/null &
echo "started pid $! -> $log"
