#!/bin/bash
# Where a shim's CPU goes while nbdcopy writes into it: the whole process, its event-loop
# thread (and that thread's user part) and the time that thread waited for a CPU, per GiB.
# Load changes these much less than wall time, so two builds can be compared on a busy
# machine: run them alternately, several times (docs/performance.md, "The shim").
#   bench/shim-write-cpu.sh BIN [COPIES]     e.g. bin/vmshift 6; prints one line
set -euo pipefail
bin=$1 copies=${2:-4}
dir=$(mktemp -d /tmp/vmshift-wcpu-XXXXXX)
sock=$dir/s.sock
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
for f in disk src; do fio --name=fill --filename="$dir/$f.raw" --rw=write --bs=1M --size=1G --ioengine=psync --end_fsync=1 --refill_buffers >/dev/null; done
"$bin" serve "$dir/disk.raw" --socket "$sock" --track bitmap --state "$sock.state.json" 2>"$dir/serve.log" &
pid=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
copy() { nbdcopy --connections=4 --requests=64 --request-size=262144 "$dir/src.raw" "nbd+unix:///disk?socket=$sock"; }
copy # warm-up: JIT, the buffer pool
# utime+stime in clock ticks (process, main thread); schedstat's second field: ns spent runnable, not running
ticks() { awk '{print $14+$15, $14}' "/proc/$pid/task/$pid/stat"; }
p0=$(awk '{print $14+$15}' "/proc/$pid/stat"); read -r m0 u0 <<<"$(ticks)"; read -r _ w0 _ <"/proc/$pid/task/$pid/schedstat"
t0=$(date +%s.%N)
for _ in $(seq "$copies"); do copy; done
t1=$(date +%s.%N)
p1=$(awk '{print $14+$15}' "/proc/$pid/stat"); read -r m1 u1 <<<"$(ticks)"; read -r _ w1 _ <"/proc/$pid/task/$pid/schedstat"
hz=$(getconf CLK_TCK)
awk -v n="$copies" -v hz="$hz" -v p="$((p1 - p0))" -v m="$((m1 - m0))" -v u="$((u1 - u0))" -v w="$((w1 - w0))" -v t0="$t0" -v t1="$t1" -v load="$(cut -d' ' -f1 /proc/loadavg)" \
  'BEGIN { printf "per GiB: wall %.3f s, process CPU %.3f s, event loop %.3f s (user %.3f), event loop waiting for a CPU %.3f s; load %s\n", (t1 - t0) / n, p / hz / n, m / hz / n, u / hz / n, w / 1e9 / n, load }'
