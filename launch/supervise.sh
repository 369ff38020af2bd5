#!/usr/bin/env bash
# Runs one node's launcher and decides what its exit means: what runs in a Kubernetes container
# (both operators) and under launch/local.sh.
#
#   [MAX_RESTARTS=N] [RESTART_DELAY=S] [EXIT_CODES=kubernetes] bash launch/supervise.sh COMMAND [ARG...]
#
# Exit codes of the training (train_dist.py, through paddle.distributed.launch), and of a prediction
# (predict.py: 0, 2, or a lost worker or rank, whose relaunch continues the output):
#   0   finished
#   2   bad config, data, checkpoint_dir or prediction input; 3 NaN/Inf stop: the same input fails the same
#       way, never retried
#   75  stopped on a signal after saving a training state: "relaunch me" (EX_TEMPFAIL, RELAUNCH_EXIT_CODE in
#       pipeline/jobs.py); anything else (a lost worker: 1, 241...) is also worth a relaunch, which resumes
# A retryable exit is relaunched here up to MAX_RESTARTS times (default 0), RESTART_DELAY seconds apart
# (default 10); then this script exits with it. With EXIT_CODES=kubernetes a retryable code below 128
# leaves as 128 + code (1 -> 129, 15 -> 143, 75 -> 203): Kubeflow's `restartPolicy: ExitCode` recreates
# a pod only for codes >= 128 (training-operator IsRetryableExitCode), and treats 1-127 as permanent.
#
# Signals. The launcher runs in its own process group, so a signal meant for this script (a terminal's
# Ctrl-C, the container runtime's SIGTERM to PID 1) reaches the launcher once, from here. The first
# SIGTERM or SIGINT is forwarded to it; later ones are not: Paddle 3.3.1's launcher answers a second
# signal by killing its workers within 10 s, which could cut a training state's save short (its first
# signal already gives them 30 s, then kills them). After a signal nothing is relaunched: the node is
# going away; the launcher's own exit after a signal is 15, retryable (143 with EXIT_CODES=kubernetes).
# SIGUSR1 (Slurm's warning before the time limit) is ignored by this script and by the launcher, and
# forwarded to the launcher's children, the training workers, which save, stop and exit 75.
set -uo pipefail

for name in MAX_RESTARTS RESTART_DELAY; do
  value=${!name:-0}
  if ! [[ $value =~ ^[0-9]{1,6}$ ]]; then
    echo "launch/supervise.sh: $name must be a whole number (0 or more), got '$value'" >&2
    exit 2
  fi
done
MAX_RESTARTS=$((10#${MAX_RESTARTS:-0}))
RESTART_DELAY=$((10#${RESTART_DELAY:-10}))
EXIT_CODES=${EXIT_CODES:-plain}
if [ "$EXIT_CODES" != plain ] && [ "$EXIT_CODES" != kubernetes ]; then
  echo "launch/supervise.sh: EXIT_CODES must be plain or kubernetes, got '$EXIT_CODES'" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then
  echo "launch/supervise.sh: no command to run" >&2
  exit 2
fi

launcher=""
signalled=""
forwarded=""
send_stop() {
  if [ -n "$signalled" ] && [ -z "$forwarded" ] && [ -n "$launcher" ]; then
    forwarded=1
    kill -TERM "$launcher" 2>/dev/null
  fi
}
trapped=""
forward_stop() {
  trapped=1
  if [ -z "$signalled" ]; then
    signalled=$1
    echo "launch/supervise.sh: SIG$1: asking the launcher to stop (the workers save a training state)" >&2
    send_stop
  fi
}
forward_usr1() {
  trapped=1
  # The workers are the launcher's children (each in its own process group, so not reached through it).
  if [ -n "$launcher" ]; then pkill -USR1 -P "$launcher" 2>/dev/null; fi
}
trap 'forward_stop TERM' TERM
trap 'forward_stop INT' INT
trap forward_usr1 USR1

retryable() { [ "$1" -ne 0 ] && [ "$1" -ne 2 ] && [ "$1" -ne 3 ]; }
leave() {
  local status=$1
  if [ "$EXIT_CODES" = kubernetes ] && retryable "$status" && [ "$status" -lt 128 ]; then
    status=$((128 + status))
  fi
  exit "$status"
}

own_group=(); if command -v setsid >/dev/null; then own_group=(setsid); fi
attempt=0
while :; do
  # In the subshell the traps above are reset to the default; USR1 is set to ignored, which the launcher
  # inherits (it installs no USR1 handler: the default would kill it), as do the workers until the
  # training installs its own handler.
  ( trap '' USR1; exec "${own_group[@]}" "$@" ) &
  launcher=$!
  send_stop  # a signal that came before the launcher's pid was known
  # `wait` returns early (128 + the signal) when a trapped signal arrives: wait again. The launcher may have
  # exited meanwhile (the workers stop at once on SIGUSR1); bash then still holds its status for this wait.
  while :; do
    trapped=""
    wait "$launcher"; status=$?
    [ -n "$trapped" ] || break
  done
  launcher=""
  if [ -n "$signalled" ]; then
    echo "launch/supervise.sh: the launcher exited with status $status after SIG$signalled" >&2
    leave "$status"
  fi
  if ! retryable "$status" || [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    leave "$status"
  fi
  attempt=$((attempt + 1))
  echo "launch/supervise.sh: the job exited with status $status; relaunching ($attempt of $MAX_RESTARTS)" \
       "in ${RESTART_DELAY} s, to continue where it stopped (the newest training state, or the output's" \
       "last complete chunk)" >&2
  sleep "$RESTART_DELAY" &
  wait $! 2>/dev/null
  if [ -n "$signalled" ]; then leave "$status"; fi
done
