#!/usr/bin/env bash
# demo.sh — checkpoint a running counter with cr-migrate, restore it, and show that it
# kept counting from where it was.
#
#   sudo deploy/demo.sh          (root; builds the workspace in release mode first)
#
# Steps: build; start `wl_counter` in its own session under a temp dir with its output
# in a log; dump it (which kills it); restore it detached with the same PID; show the
# log before and after and check the count continued; ask it to verify its memory
# (SIGUSR2 -> PASS/FAIL line); kill it, reap it, remove the temp dir.
#
# Command contract used (the binaries may not implement it yet):
#   cr-migrate dump --pid PID --images-dir DIR [--leave-running]
#   cr-migrate restore --images-dir DIR [--detach]
#
# Reaping: `restore --detach` leaves the restored counter an orphan. An orphan goes to
# the nearest subreaper, else to PID 1 — which on these VMs never reaps, so a killed
# counter would stay a zombie holding its PID. util-linux has no subreaper tool
# (`setsid` only starts a session; `unshare --fork --pid` makes a PID namespace, which
# changes the PIDs we want to keep), so this script re-executes itself under a small
# python3 subreaper (prctl PR_SET_CHILD_SUBREAPER) that reaps every orphan while the
# script runs and kills and reaps whatever is left when it ends.
set -euo pipefail

read -r -d '' SUBREAPER_PY <<'PY' || true
import ctypes, os, signal, sys

PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("demo: prctl(PR_SET_CHILD_SUBREAPER): " + os.strerror(ctypes.get_errno()))
me = os.getpid()
os.environ["CRM_DEMO_SUBREAPER"] = str(me)
script = os.fork()
if script == 0:
    os.execvp("bash", ["bash"] + sys.argv[1:])

def forward(signum, _frame):
    try:
        os.kill(script, signum)
    except ProcessLookupError:
        pass

for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, forward)

def kill_leftovers():
    """SIGKILL our children (orphans reparented to us) once the script is gone."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            print(f"demo subreaper: killing leftover PID {entry}", file=sys.stderr)
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass

status = None
while True:
    if status is not None:
        kill_leftovers()
    try:
        pid, wstatus = os.wait()
    except ChildProcessError:
        break
    if pid == script:
        status = os.waitstatus_to_exitcode(wstatus)
        status = status if status >= 0 else 128 - status
sys.exit(1 if status is None else status)
PY

if [[ "${CRM_DEMO_SUBREAPER:-}" != "$PPID" ]]; then
    command -v python3 >/dev/null || { echo "demo: python3 is needed for the subreaper" >&2; exit 1; }
    exec python3 -c "$SUBREAPER_PY" "$0" "$@"
fi

# ---------------------------------------------------------------- helpers

step() { printf '\n== %s\n' "$*"; }
die() { echo "demo: FAILED: $*" >&2; exit 1; }

# True if PID runs (exists and is not a zombie).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Waits up to 5 s for PID to be gone from /proc (dead and reaped).
wait_gone() {
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -e /proc/$1 ]] || return 0
        sleep 0.1
    done
    return 1
}

# Waits up to 10 s for a line matching the regex $2 in file $1, prints it.
wait_line() {
    local i line
    for ((i = 0; i < 100; i++)); do
        if line=$(grep -E -m1 -- "$2" "$1" 2>/dev/null); then
            printf '%s\n' "$line"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Last `count N` value in a file (empty if none).
last_count() { grep -oE '^count [0-9]+' "$1" 2>/dev/null | tail -n1 | cut -d' ' -f2 || true; }

# ---------------------------------------------------------------- the demo

[[ $EUID -eq 0 ]] || die "run as root (ptrace, clone3 set_tid, PR_SET_MM need it)"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
crm=$target/release/cr-migrate
wl=$target/release/wl_counter

work=$(mktemp -d /tmp/crm-demo.XXXXXX)
log=$work/counter.log
images=$work/images
pid=

cleanup() {
    if [[ -n $pid ]] && alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == wl_counter ]]; then
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" || echo "demo: PID $pid still not reaped" >&2
    fi
    rm -rf "$work"
}
trap cleanup EXIT

step "build (cargo build --release; the workloads: -p crm-tests --bins)"
cargo build --release
cargo build --release -p crm-tests --bins
[[ -x $crm ]] || die "no $crm after the build"
[[ -x $wl ]] || die "no $wl after the build"

step "start wl_counter in its own session, output to $log"
# `setsid --fork` returns at once; the counter is orphaned to our subreaper, which
# reaps it whenever it dies (after the dump, or at the end). Its PID comes from READY.
# Descriptors this shell inherited (a terminal multiplexer's, an IDE's
# pipe...) would be inherited by the counter too, and `dump` refuses a pipe
# to another process: the subshell closes everything above stderr first.
(
    cd "$work" || exit 1
    for fd in /proc/self/fd/*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null
    done
    exec setsid --fork "$wl" >"$log" 2>&1 </dev/null
)
ready=$(wait_line "$log" '^READY pid=') || die "wl_counter did not report READY; log: $(cat "$log")"
echo "$ready"
[[ $ready =~ pid=([0-9]+) ]] || die "no PID in: $ready"
pid=${BASH_REMATCH[1]}
alive "$pid" || die "wl_counter (PID $pid) is not running"
sleep 2.5
echo "-- log before the dump:"
tail -n 3 "$log"
before=$(last_count "$log")
[[ -n $before ]] || die "no count line before the dump"

step "dump PID $pid to $images"
"$crm" dump --pid "$pid" --images-dir "$images"
# The dump killed the counter and our subreaper reaped it: its PID must be free now,
# or the restore could not give it back.
wait_gone "$pid" || die "PID $pid still exists after the dump (still running or a zombie)"
log_size=$(stat -c %s "$log")
echo "dumped at count $before; PID $pid is gone; images:"
ls -l "$images"

step "restore from $images (detached)"
"$crm" restore --images-dir "$images" --detach
alive "$pid" || die "no process with PID $pid after the restore"
[[ $(cat "/proc/$pid/comm") == wl_counter ]] || die "PID $pid is not wl_counter after the restore"
sleep 2.5
echo "-- log after the restore:"
tail -n 3 "$log"
after=$(tail -c +"$((log_size + 1))" "$log" | grep -oE '^count [0-9]+' | tail -n1 | cut -d' ' -f2 || true)
[[ -n $after ]] || die "the restored counter printed no count line"
((after > before)) || die "count restarted or went back: $before before the dump, $after after"
echo "the counter continued: $before before the dump, $after now"

step "ask the restored counter to verify its memory (SIGUSR2)"
kill -USR2 "$pid"
verdict=$(wait_line "$log" '^(PASS|FAIL)') || die "no PASS/FAIL line after SIGUSR2"
echo "$verdict"
[[ $verdict == PASS* ]] || die "the restored counter reports: $verdict"

step "stop the restored counter (our subreaper reaps it)"
kill -TERM "$pid"
wait_gone "$pid" || die "PID $pid not reaped after SIGTERM"
pid=

step "demo: OK (counter continued from $before to $after across dump and restore)"
