#!/usr/bin/env bash
# A throw-away N-node Slurm cluster on one machine: every node is its own host on a private network.
#
#   tests/slurm/multinode_cluster.sh start DIR [NODES]   munged + slurmctld (shared) and one slurmd per node
#                                                        (default 2 nodes: node1, node2); prints
#                                                        `export SLURM_CONF=DIR/slurm.conf` as its last line
#   tests/slurm/multinode_cluster.sh stop DIR            scancel every job, stop every daemon, delete the
#                                                        namespaces, the bridge and the host files
#   tests/slurm/multinode_cluster.sh status DIR          sinfo + squeue
#   tests/slurm/multinode_cluster.sh exec DIR NODE CMD.. run CMD on NODE (its network and UTS namespace)
#   tests/slurm/multinode_cluster.sh kill-node DIR NODE  a host dying: SIGKILL every process on NODE
#                                                        (its slurmd, job steps and ranks), address kept
#   tests/slurm/multinode_cluster.sh start-node DIR NODE the host coming back: start its slurmd again
#   tests/slurm/multinode_cluster.sh cleanup             remove what crashed earlier runs left behind
#
# Why this way: multi-node code paths (MASTER_ADDR from the node list, per-node LOCAL_RANK, a
# rendezvous between hosts, checkpoints written from several hosts, a node dying) only exist when
# the ranks really run on different hosts. Each node here is a Linux network namespace with a veth
# into a private bridge and its own IP (10.77.X.2, .3, ...; the bridge, 10.77.X.1, is the
# controller's address), entered with its own mount namespace (so that /etc/netns/<ns>/hosts is
# its /etc/hosts) and UTS namespace (its own hostname). Every node runs its own slurmd
# (NodeName = NodeHostname = nodeI, NodeAddr = its IP); munged and slurmctld run once, in the
# machine's own network namespace, and everything shares the filesystem (as a cluster's shared
# /home would). No traffic leaves the bridge: it has no route out and IP forwarding is not touched.
#
# Reuse: `start` is independent of the AGRO scripts; tests/slurm/conftest.py has the fixture.
# Each cluster gets a random 5-hex-digit tag (namespaces agro-TAG-nodeI, bridge agbTAG) and a free
# 10.77.X.0/24, so several clusters can run at once; /run/agro-slurm-clusters/TAG records which DIR
# owns them, and `start` (or `cleanup`) first removes those whose DIR or slurmctld is gone.
# Exit status 77 means "cannot run here" (not root, no `ip netns`, no Slurm) with the reason on
# stderr; the tests skip with it. Slurm itself is installed by tests/slurm/cluster.sh install.
set -euo pipefail

SKIP=77
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REGISTRY=/run/agro-slurm-clusters

cannot() { echo "multinode_cluster.sh: cannot run a multi-node Slurm cluster here: $*" >&2; exit "$SKIP"; }
CLUSTER_DIR=""   # set by start: a failed start tears down what it had made
die() {
    echo "multinode_cluster.sh: $*" >&2
    [ -n "$CLUSTER_DIR" ] && teardown "$CLUSTER_DIR" >/dev/null 2>&1
    exit 1
}

wait_for() {  # wait_for SECONDS COMMAND...
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.3
    done
}

pid_is() {  # pid alive and its command line contains NAME (guards against a recycled pid)
    local pid=$1 name=$2
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, then KILL after 10 s; only if the pid is that daemon
    local file=$1 name=$2 pid end
    [ -r "$file" ] || return 0
    pid=$(cat "$file")
    if pid_is "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        end=$((SECONDS + 10))
        while pid_is "$pid" "$name" && [ "$SECONDS" -lt "$end" ]; do sleep 0.2; done
        pid_is "$pid" "$name" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("0.0.0.0", 0)); print(s.getsockname()[1])'; }

load_env() {  # the cluster's TAG / SUBNET / NODES, written by start
    local dir=$1
    [ -r "$dir/cluster.env" ] || { echo "multinode_cluster.sh: $dir is not a multi-node cluster (no cluster.env)" >&2; exit 1; }
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
}

ns_of() { echo "agro-$TAG-$1"; }              # node name -> its network namespace

node_index() {  # node1 -> 1; anything else is an error
    local n=${1#node}
    [[ "$1" == node* && "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le "$NODES" ]] \
        || { echo "multinode_cluster.sh: no node '$1' (nodes: node1..node$NODES)" >&2; exit 2; }
    echo "$n"
}

# on_node NODE CMD...: in the node's network namespace, with its hostname (a UTS namespace) and its
# /etc/hosts (a private mount namespace). Not `ip netns exec`: that also mounts a fresh /sys, which
# hides /sys/fs/cgroup, and slurmd will not start without it.
on_node() {
    local node=$1 ns; shift
    ns=$(ns_of "$node")
    nsenter --net="/run/netns/$ns" -- unshare --mount --uts --propagation private -- \
        sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' \
        "/etc/netns/$ns/hosts" "$node" "$@"
}

start_slurmd() {
    local dir=$1 node=$2
    SLURM_CONF=$dir/slurm.conf on_node "$node" slurmd -f "$dir/slurm.conf" -N "$node" \
        || die "slurmd on $node failed: $(tail -5 "$dir/log/slurmd-$node.log" 2>/dev/null)"
}

node_state() { SLURM_CONF=$1/slurm.conf scontrol show node "$2" | grep -o 'State=[^ ]*' | head -1; }

# ---- teardown (also of leftovers) ------------------------------------------------------------

# Everything a cluster made, by tag; safe to call on a half-made cluster and twice.
teardown_tag() {
    local tag=$1 dir=${2:-} ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^agro-$tag-" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip link del "agb$tag" 2>/dev/null || true   # also removes the veths' host ends still attached
    if [ -n "$dir" ]; then
        stop_pidfile "$dir/slurmctld.pid" slurmctld
        stop_pidfile "$dir/munge/munged.pid" munged
    fi
    rm -f "$REGISTRY/$tag"
}

teardown() {  # teardown DIR
    local dir=$1
    [ -r "$dir/cluster.env" ] || return 0
    # shellcheck disable=SC1091
    ( . "$dir/cluster.env"; teardown_tag "$TAG" "$dir" )
}

# A registered cluster is stale when its directory is gone or its slurmctld no longer runs
# (a test process killed before its finalizer ran); a live one belongs to someone else: untouched.
cleanup_stale() {
    local entry tag dir
    mkdir -p "$REGISTRY"
    for entry in "$REGISTRY"/*; do
        [ -e "$entry" ] || continue
        tag=$(basename "$entry"); dir=$(cat "$entry" 2>/dev/null || true)
        if [ -n "$dir" ] && [ -r "$dir/slurmctld.pid" ] && pid_is "$(cat "$dir/slurmctld.pid")" slurmctld; then
            continue
        fi
        echo "multinode_cluster.sh: removing the leftovers of cluster $tag (${dir:-no dir})" >&2
        teardown_tag "$tag" "$dir"
    done
    # namespaces/bridges of ours with no registry entry at all (crash between creating and registering)
    for tag in $( (ip netns list 2>/dev/null | awk '{print $1}' | sed -n 's/^agro-\([0-9a-f]\{5\}\)-node[0-9]*$/\1/p';
                   ip -o link show type bridge 2>/dev/null | sed -n 's/^[0-9]*: agb\([0-9a-f]\{5\}\)[:@].*/\1/p') | sort -u); do
        [ -e "$REGISTRY/$tag" ] || { echo "multinode_cluster.sh: removing unregistered leftovers agro-$tag" >&2; teardown_tag "$tag"; }
    done
}

# ---- start ------------------------------------------------------------------------------------

preflight() {
    [ "$(id -u)" = 0 ] || cannot "network namespaces, the bridge and slurmd need root (running as uid $(id -u))"
    command -v ip >/dev/null 2>&1 || cannot "no 'ip' command (iproute2)"
    command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 \
        || cannot "no 'unshare'/'nsenter' (util-linux) to give the nodes their hostnames"
    local probe="agro-probe-$$"
    ip netns add "$probe" 2>/dev/null || cannot "'ip netns add' fails here (no network namespaces in this container?)"
    if ! nsenter --net="/run/netns/$probe" -- unshare --mount --uts --propagation private true 2>/dev/null; then
        ip netns del "$probe"; cannot "'unshare --mount --uts' fails inside a network namespace (no UTS/mount namespaces?)"
    fi
    ip netns del "$probe"
    ip link add "agbprobe$$" type bridge 2>/dev/null || cannot "cannot create a bridge (ip link add type bridge)"
    ip link del "agbprobe$$"
    bash "$HERE/cluster.sh" install   # exits 77 itself when Slurm is missing and cannot be installed
    id munge >/dev/null 2>&1 || cannot "the munge package did not create a 'munge' user"
    [ -r /etc/munge/munge.key ] || cannot "/etc/munge/munge.key is missing (the munge package normally creates it)"
}

pick_subnet() {  # a 10.77.X.0/24 no interface or route of this machine uses
    local x used
    used=$(ip -4 -o addr show; ip -4 route show table all 2>/dev/null || true)
    for x in $(seq 1 250); do
        grep -q "10\.77\.$x\." <<<"$used" || { echo "10.77.$x"; return; }
    done
    die "no free 10.77.X.0/24 subnet"
}

write_conf() {
    local dir=$1 ctld_port slurmd_port node_hw i
    ctld_port=$(free_port); slurmd_port=$(free_port)
    node_hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')   # CPUs, cores, memory as slurmd measures them
    {
        echo "# Written by tests/slurm/multinode_cluster.sh: a $NODES-node test cluster, all state in $dir"
        echo "ClusterName=agromulti"
        echo "SlurmctldHost=ctl($SUBNET.1)"
        cat <<EOF
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
# A node that stops answering is DOWN after SlurmdTimeout (default 300 s; short here so that the
# node-fault test is quick) and its running batch jobs that allow it are requeued (JobRequeue);
# a node that registers again returns to service by itself (ReturnToService=2).
SlurmdTimeout=10
ReturnToService=2
JobRequeue=1
# Seconds between the SIGTERM of a cancel/requeue and the SIGKILL: enough for the ranks to finish
# their step and save a checkpoint on a loaded 2-core machine.
KillWait=60
MinJobAge=600
EOF
        for i in $(seq 1 "$NODES"); do
            echo "NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.$((i + 1)) $node_hw State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
    } >"$dir/slurm.conf"
}

make_network() {
    local i node ns veth
    ip link add "agb$TAG" type bridge
    ip addr add "$SUBNET.1/24" dev "agb$TAG"
    ip link set "agb$TAG" up
    for i in $(seq 1 "$NODES"); do
        node=node$i; ns=$(ns_of "$node"); veth="agv$TAG-$i"
        ip netns add "$ns"
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "agb$TAG"
        ip link set "$veth" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip addr add "$SUBNET.$((i + 1))/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            echo "$SUBNET.1 ctl"
            local j; for j in $(seq 1 "$NODES"); do echo "$SUBNET.$((j + 1)) node$j"; done
        } >"/etc/netns/$ns/hosts"
    done
}

start() {
    local dir=${1:?usage: multinode_cluster.sh start DIR [NODES]} nodes=${2:-2} i
    [[ "$nodes" =~ ^[0-9]+$ && "$nodes" -ge 1 && "$nodes" -le 16 ]] || { echo "NODES must be 1..16, not '$nodes'" >&2; exit 2; }
    preflight
    mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
    [ -e "$dir/slurm.conf" ] && { echo "multinode_cluster.sh: $dir already holds a cluster; stop it first" >&2; exit 1; }
    mkdir -p "$REGISTRY"
    exec 9>"$REGISTRY/.lock"; flock 9            # one start at a time: subnet and tag choice, stale cleanup
    cleanup_stale
    TAG=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n' | cut -c1-5)
    while [ -e "$REGISTRY/$TAG" ]; do TAG=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n' | cut -c1-5); done
    SUBNET=$(pick_subnet); NODES=$nodes
    printf 'TAG=%s\nSUBNET=%s\nNODES=%s\n' "$TAG" "$SUBNET" "$NODES" >"$dir/cluster.env"
    echo "$dir" >"$REGISTRY/$TAG"
    CLUSTER_DIR=$dir
    make_network || die "could not build the network (bridge agb$TAG, namespaces agro-$TAG-*)"
    flock -u 9

    chmod 755 "$dir"   # munged (user munge) must reach its socket dir inside
    mkdir -p "$dir/state" "$dir/log" "$dir/munge"
    for i in $(seq 1 "$NODES"); do mkdir -p "$dir/spool/node$i"; done
    chown munge:munge "$dir/munge"; chmod 755 "$dir/munge"
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
        || die "munged failed to start: $(tail -3 "$dir/munge/munged.log" 2>/dev/null)"
    wait_for 10 sh -c "munge -n -S '$dir/munge/munge.socket' | unmunge -S '$dir/munge/munge.socket'" \
        || die "munged does not answer on $dir/munge/munge.socket"

    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    unshare --uts -- sh -c 'hostname ctl && exec slurmctld -f "$0"' "$SLURM_CONF" \
        || die "slurmctld failed: $(tail -5 "$dir/log/slurmctld.log" 2>/dev/null)"
    wait_for 20 scontrol ping || die "slurmctld does not answer: $(tail -5 "$dir/log/slurmctld.log")"
    for i in $(seq 1 "$NODES"); do start_slurmd "$dir" "node$i"; done
    all_idle() { [ "$(sinfo -h -N -o '%N %t' | grep -c ' idle$')" = "$NODES" ]; }
    wait_for 40 all_idle || die "nodes did not become idle: $(sinfo -N -h -o '%N %t %E'); $(tail -3 "$dir"/log/slurmd-*.log)"
    echo "multinode_cluster.sh: $NODES-node Slurm up in $dir (tag $TAG, $SUBNET.0/24: $(sinfo -h -N -o '%N=%t' | tr '\n' ' '))" >&2
    echo "export SLURM_CONF=$dir/slurm.conf"
}

stop() {
    local dir=${1:?usage: multinode_cluster.sh stop DIR}
    load_env "$dir"
    export SLURM_CONF=$dir/slurm.conf
    if scontrol ping >/dev/null 2>&1; then   # job steps outlive a stopped slurmd: cancel, wait for them
        local jobs; jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            no_jobs() { [ -z "$(squeue -h -o %i -t R,CG,CF 2>/dev/null)" ]; }
            wait_for 30 no_jobs || echo "multinode_cluster.sh: jobs still listed: $(squeue -h)" >&2
        fi
    fi
    local i
    for i in $(seq 1 "$NODES"); do stop_pidfile "$dir/slurmd-node$i.pid" slurmd; done
    teardown_tag "$TAG" "$dir"   # kills whatever is still in a namespace, deletes namespaces and bridge
    echo "multinode_cluster.sh: stopped the cluster in $dir (tag $TAG)" >&2
}

kill_node() {
    local dir=$1 node=$2 ns pid n=0
    load_env "$dir"; node_index "$node" >/dev/null
    ns=$(ns_of "$node")
    for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null && n=$((n + 1)); done
    rm -f "$dir/slurmd-$node.pid"
    echo "multinode_cluster.sh: killed $n processes on $node" >&2
}

start_node() {
    local dir=$1 node=$2
    load_env "$dir"; node_index "$node" >/dev/null
    start_slurmd "$dir" "$node"
    echo "multinode_cluster.sh: slurmd on $node started again" >&2
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) shift; stop "${1:?usage: $0 stop DIR}" ;;
    status) shift; load_env "${1:?usage: $0 status DIR}"; SLURM_CONF=$1/slurm.conf sinfo -N; SLURM_CONF=$1/slurm.conf squeue ;;
    exec) shift; d=${1:?}; nd=${2:?}; shift 2; load_env "$d"; node_index "$nd" >/dev/null; on_node "$nd" "$@" ;;
    kill-node) shift; kill_node "${1:?}" "${2:?usage: $0 kill-node DIR NODE}" ;;
    start-node) shift; start_node "${1:?}" "${2:?usage: $0 start-node DIR NODE}" ;;
    cleanup) mkdir -p "$REGISTRY"; exec 9>"$REGISTRY/.lock"; flock 9; cleanup_stale ;;
    *) echo "usage: $0 start DIR [NODES] | stop DIR | status DIR | exec DIR NODE CMD... | kill-node DIR NODE |" \
            "start-node DIR NODE | cleanup" >&2; exit 2 ;;
esac
