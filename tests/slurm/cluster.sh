#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on this machine, for the `slurm` test tier.
#
#   tests/slurm/cluster.sh start [DIR]   install packages if missing, start munged, slurmctld, slurmd;
#                                        prints `export SLURM_CONF=DIR/slurm.conf` as its last line
#   tests/slurm/cluster.sh stop DIR      scancel every job, wait for them, stop the daemons started here
#   tests/slurm/cluster.sh status DIR    sinfo + squeue
#   tests/slurm/cluster.sh install       only install the packages if missing (multinode_cluster.sh uses it)
#
# Why this way: Debian's slurmctld/slurmd/slurm-client/munge packages (Slurm 22.05) run without
# systemd. Everything lives in DIR (config, state, spool, logs, pid files, munge socket) and uses
# free TCP ports, so a system Slurm or munge on the same machine is neither used nor touched, and
# `stop` kills only the pids this script wrote. Exit status 77 means "cannot run here" (not root,
# no apt-get, packages unavailable); the message on stderr says which, and the tests skip with it.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
SKIP=77

CLUSTER_DIR=""   # set by start: a failed start stops the daemons it had already started
die() {
    echo "cluster.sh: $*" >&2
    [ -n "$CLUSTER_DIR" ] && stop_daemons "$CLUSTER_DIR"
    exit 1
}
cannot() { echo "cluster.sh: cannot run a Slurm cluster here: $*" >&2; exit "$SKIP"; }

have_binaries() {
    local b
    for b in slurmctld slurmd sbatch scontrol squeue scancel munged; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    have_binaries && return 0
    [ "$(id -u)" = 0 ] || cannot "Slurm is not installed and installing it needs root (running as uid $(id -u))"
    command -v apt-get >/dev/null 2>&1 || cannot "Slurm is not installed and there is no apt-get to install ${PACKAGES[*]}"
    # Keep the packages' init scripts from starting system daemons with /etc/slurm's config:
    # a policy-rc.d that denies every start, only while installing and only if none exists.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    echo "cluster.sh: installing ${PACKAGES[*]} with apt-get" >&2
    local ok=0
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1; then
        ok=1
    elif apt-get update -qq >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1; then
        ok=1
    fi
    [ "$made_policy" = 1 ] && rm -f "$policy"
    [ "$ok" = 1 ] || cannot "apt-get could not install ${PACKAGES[*]} (no package index or no network to a mirror)"
    have_binaries || cannot "installed ${PACKAGES[*]} but slurmctld/slurmd/sbatch/munged are still not on PATH"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# pid alive and its command is the daemon we expect (guards against a recycled pid)
pid_is() {
    local pid=$1 name=$2
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.3
    done
}

write_conf() {
    local dir=$1 ctld_port slurmd_port node_line
    ctld_port=$(free_port); slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    # CPUs/boards/sockets/cores/threads/memory exactly as slurmd measures them, under our node name
    node_line=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster, all state in $dir
ClusterName=agrotest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 $node_line State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || cannot "the test cluster runs slurmd as root and munged as the munge user (running as uid $(id -u))"
    install_packages
    id munge >/dev/null 2>&1 || cannot "the munge package did not create a 'munge' user"
    [ -r /etc/munge/munge.key ] || cannot "/etc/munge/munge.key is missing (the munge package normally creates it)"
    local dir=${1:-}
    if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/agro-slurm.XXXXXX); fi
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
    [ -e "$dir/slurm.conf" ] && { echo "cluster.sh: $dir already holds a cluster; stop it first or use another directory" >&2; exit 1; }
    CLUSTER_DIR=$dir
    chmod 755 "$dir"   # munged (user munge) must reach its socket dir inside
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    chown munge:munge "$dir/munge"; chmod 755 "$dir/munge"

    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
        || die "munged failed to start: $(tail -3 "$dir/munge/munged.log" 2>/dev/null)"
    wait_for 10 munge sh -c "munge -n -S '$dir/munge/munge.socket' | unmunge -S '$dir/munge/munge.socket'" \
        || die "munged does not answer on $dir/munge/munge.socket"

    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF" || die "slurmctld failed: $(tail -5 "$dir/log/slurmctld.log" 2>/dev/null)"
    wait_for 20 slurmctld scontrol ping || die "slurmctld does not answer: $(tail -5 "$dir/log/slurmctld.log")"
    slurmd -f "$SLURM_CONF" -N localhost || die "slurmd failed: $(tail -5 "$dir/log/slurmd.log" 2>/dev/null)"
    node_idle() { scontrol show node localhost | grep -Eq 'State=IDLE'; }
    wait_for 30 "node idle" node_idle \
        || die "node did not become idle: $(scontrol show node localhost | grep -E 'State|Reason'); $(tail -5 "$dir/log/slurmd.log")"
    echo "cluster.sh: one-node Slurm up in $dir ($(sinfo -h -o '%P %D %t %c CPUs'))" >&2
    echo "export SLURM_CONF=$dir/slurm.conf"
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, then KILL after 10 s; only if the pid is that daemon
    local file=$1 name=$2 pid
    [ -r "$file" ] || return 0
    pid=$(cat "$file")
    if pid_is "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        local end=$((SECONDS + 10))
        while pid_is "$pid" "$name" && [ "$SECONDS" -lt "$end" ]; do sleep 0.2; done
        pid_is "$pid" "$name" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    local dir=${1:?usage: cluster.sh stop DIR}
    [ -e "$dir/slurm.conf" ] || die "$dir is not a cluster directory (no slurm.conf)"
    export SLURM_CONF=$dir/slurm.conf
    if scontrol ping >/dev/null 2>&1; then
        # Job steps outlive a stopped slurmd: cancel every job and wait until none is left.
        local jobs; jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            no_jobs() { [ -z "$(squeue -h -o %i 2>/dev/null)" ]; }
            wait_for 60 "jobs gone" no_jobs || echo "cluster.sh: jobs still listed: $(squeue -h)" >&2
        fi
    fi
    stop_daemons "$dir"
    echo "cluster.sh: stopped the cluster in $dir" >&2
}

stop_daemons() {
    stop_pidfile "$1/slurmd.pid" slurmd
    stop_pidfile "$1/slurmctld.pid" slurmctld
    stop_pidfile "$1/munge/munged.pid" munged
}

status() {
    local dir=${1:?usage: cluster.sh status DIR}
    export SLURM_CONF=$dir/slurm.conf
    sinfo; squeue
}

case "${1:-}" in
    start) shift; start "${1:-}" ;;
    stop) shift; stop "${1:-}" ;;
    status) shift; status "${1:-}" ;;
    install) install_packages ;;
    *) echo "usage: $0 start [DIR] | stop DIR | status DIR | install" >&2; exit 2 ;;
esac
