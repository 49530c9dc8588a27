#!/usr/bin/env bash
# A real Slurm cluster on this machine, for development and tests.
#
#   bash launch/slurm_cluster.sh up [--nodes 2]|down|status|env|purge
#
# Debian's daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd) run as root on loopback,
# with every file (configs, munge key, sockets, pid files, logs, controller state, database)
# under $MULTIEYE_SLURM_DIR (default /tmp/multieye-slurm). Nothing under /etc is read or written:
# clients find the cluster through SLURM_CONF, which `env` prints.
#
# Why a database: submitit (1.5.4) asks `sacct` for job states, and in Slurm 22.05 sacct only
# answers through slurmdbd, whose only storage is MySQL/MariaDB (the old filetxt accounting
# storage is gone). Without it job.state stays UNKNOWN and a job that dies without writing its
# result would be waited on forever.
#
# `up --nodes N` (or MULTIEYE_SLURM_NODES=N) adds N more nodes, node1..nodeN in partition
# `multi`, each a slurmd of its own in a network namespace of its own (`ip netns`), so that a job
# spans N real network stacks. Why namespaces: Debian builds Slurm without
# --enable-multiple-slurmd, so two slurmd in one network stack cannot share the machine; in a
# namespace each has its own ports and addresses. Each namespace holds one end of a veth pair
# whose other end sits in a bridge in this namespace; the bridge carries a private /24
# (10.A.B.0/24, chosen per state directory: .1 = the bridge, where slurmctld is reached, .2.. =
# the nodes). The namespaces share this filesystem, so munge's socket, the spool and the job's
# files are the same for every node. The default partition (`debug`, this host's own node on
# 127.0.0.1) is the same with or without them.
#
# Exit codes: 0 ok; 1 failure (with the daemon logs' tails); 3 Slurm cannot be booted here
# (not root, packages missing: run install.sh as root; network namespaces not permitted for
# --nodes), which tests turn into a skip.
set -euo pipefail

DIR=${MULTIEYE_SLURM_DIR:-/tmp/multieye-slurm}
CLUSTER=multieye
PARTITION=debug
MULTI=multi # the namespace nodes' partition
MARKER=$DIR/.multieye-slurm # `purge` only deletes a directory that carries it
ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
CONF=$ETC/slurm.conf
MUNGE_SOCKET=$RUN/munge.socket.2
DB_SOCKET=$RUN/mariadb.sock
NODE=$(hostname -s) # this host's own node (slurmd -C names it so)
NETENV=$ETC/net.env # what `up --nodes` made in the network: read back by `down`
# Extra (namespace) nodes: `up` records the number in $ETC/nodes. Not asked for: those of the
# running cluster (a plain `up` checks it, whatever it has), or none.
NODES=${MULTIEYE_SLURM_NODES:-}
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
cannot() { echo "slurm_cluster.sh: cannot boot Slurm here: $*" >&2; exit 3; }

# Daemons are named by program, and a namespace node's slurmd as slurmd-NODE (SlurmdPidFile has
# %n: one pid file per node).
pidfile() {
  case $1 in
    slurmd) echo "$RUN/slurmd-$NODE.pid" ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}

# The namespace nodes' names (node1..nodeN) and their daemons.
ns_nodes() {
  local i n
  n=$(cat "$ETC/nodes" 2>/dev/null || echo 0)
  for ((i = 1; i <= n; i++)); do echo "node$i"; done
}
all_daemons() {
  local node
  echo "${DAEMONS[@]}"
  for node in $(ns_nodes); do echo "slurmd-$node"; done
}

# The pid recorded for daemon $1, if that process is alive and is that program: a stale pid file
# whose pid was reused by something else must never be signalled.
live_pid() {
  local f pid exe
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  # Debian installs slurmctld and slurmd as alternatives (slurmctld -> slurmctld-wlm).
  [ "${exe% (deleted)}" = "$(readlink -f "$(command -v "${1%%-*}")")" ] || return 1
  echo "$pid"
}

running_count() {
  local n=0 d
  for d in $(all_daemons); do live_pid "$d" >/dev/null && n=$((n + 1)); done
  echo "$n"
}

check_can_boot() {
  [ "$(id -u)" = 0 ] || cannot "not root (the daemons run as root; uid $(id -u))"
  local missing=() b
  for b in flock munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd \
    sbatch sinfo squeue scontrol scancel sacct sacctmgr ss; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  if [ "$NODES" != 0 ]; then
    command -v ip >/dev/null || missing+=(ip)
    command -v nsenter >/dev/null || missing+=(nsenter)
  fi
  [ ${#missing[@]} = 0 ] || cannot "missing ${missing[*]} (run install.sh as root)"
}

# A loopback TCP port nobody listens on. The range sits below Linux's ephemeral range
# (32768+) so that client sockets are unlikely to take it between now and the daemon's bind.
free_port() {
  local used p
  used=$(ss -Htln | awk '{print $4}' | sed 's/.*://' | sort -u)
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    grep -qx "$p" <<<"$used" || { echo "$p"; return; }
  done
  die "no free port found"
}

logs_tail() {
  local f
  for f in "$LOG"/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 15 lines)" >&2
    tail -n 15 "$f" >&2
  done
}

fail() { echo "slurm_cluster.sh: $*" >&2; logs_tail; exit 1; }

# Wait up to $1 seconds (wall clock: one try may itself block) for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  while ((SECONDS < deadline)); do
    if declare -F "$1" >/dev/null; then
      "$@" >/dev/null 2>&1 && return 0
    else
      timeout 10 "$@" >/dev/null 2>&1 && return 0
    fi
    sleep 0.2
  done
  return 1
}

write_configs() {
  local host node_line mem rmem ctld_port slurmd_port dbd_port db_port ctld_addr=127.0.0.1
  host=$(hostname -s)
  # slurmd -C prints the node as slurmd itself will detect it (name, sockets, cores, threads,
  # memory); the name must match or slurmd refuses to start.
  node_line=$(slurmd -C | head -n 1)
  [[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  # A little below the total so that the node is not drained for having less than configured.
  rmem=$((mem * 9 / 10))
  node_line=${node_line/RealMemory=$mem/RealMemory=$rmem}
  # With namespace nodes, slurmctld is reached at the bridge's address: one of this host's own
  # (so its own slurmd and the clients reach it too), and the only one the namespaces see.
  [ "$NODES" = 0 ] || ctld_addr=$(net_addr 1)
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  dbd_port=$(free_port)
  db_port=$(free_port)
  [ -s "$ETC/db.pass" ] ||
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$ETC/db.pass")

  cat >"$CONF" <<EOF
# Written by launch/slurm_cluster.sh; rewritten on every 'up' from a stopped cluster.
ClusterName=$CLUSTER
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged, so that a system munged (other key, other socket) is never involved.
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
# %n: the node's name, so that every node's slurmd has its own spool, pid file and log.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
# CPUs are the consumable: several 1-CPU jobs, array tasks or job steps share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0,sched_min_interval=100000
# Refuse at submission what the partition can never run (too many nodes or CPUs), as
# production clusters usually do, instead of queueing it as pending forever.
EnforcePartLimits=ALL
# Jobs may be requeued (scontrol requeue; submitit on preemption and timeout).
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=2
Waittime=0
# Finished jobs stay visible to scontrol for 5 minutes; sacct has them for good.
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# For slurmdbd connections this, not AuthInfo, names the munge socket.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
# No mail on this machine; the default (/bin/mail) is missing and logged as an error.
MailProg=/bin/true
NodeName=${node_line#NodeName=} NodeAddr=127.0.0.1 NodeHostname=$host State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$NODES" != 0 ]; then
    # The namespace nodes: this host's CPUs and memory each (nothing enforces them), their own
    # names (slurmd -N) and addresses. NodeHostname must differ per node in this build.
    local i hw=${node_line#NodeName=* }
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=node$i $hw NodeAddr=$(net_addr $((i + 1))) NodeHostname=node$i State=UNKNOWN"
    done >>"$CONF"
    echo "PartitionName=$MULTI Nodes=node[1-$NODES] MaxTime=INFINITE State=UP" >>"$CONF"
  fi

  # slurmdbd finds slurmdbd.conf next to SLURM_CONF, and refuses it unless it is private.
  (
    umask 077
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by launch/slurm_cluster.sh.
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
PidFile=$(pidfile slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
  )
  echo "$db_port" >"$ETC/db.port"
}

# ----------------------------------------------------------------- namespace nodes (--nodes N)

# Names of what `up --nodes` makes, from NET_ID (4 hex digits, per state directory): interface
# names must fit in 15 characters.
net_load() { [ -s "$NETENV" ] && . "$NETENV"; }
net_addr() { echo "$NET_PREFIX.$1"; }
ns_name() { echo "multieye-$NET_ID-$1"; }
bridge_name() { echo "mebr$NET_ID"; }

# A /24 and names that nothing on this machine uses yet, derived from the state directory so
# that two clusters (two test sessions) pick different ones.
net_choose() {
  local id prefix
  id=$(($(printf %s "$DIR" | cksum | cut -d' ' -f1) % 65536))
  for _ in $(seq 100); do
    NET_ID=$(printf %04x "$id")
    prefix="10.$((100 + id % 150)).$((id / 150 % 256))"
    if ! ip -4 route show table all | grep -q "^\(local \|broadcast \)\?$prefix\." &&
      ! ip link show "$(bridge_name)" >/dev/null 2>&1 &&
      ! ip netns list | grep -q "^multieye-$NET_ID-"; then
      NET_PREFIX=$prefix
      printf 'NET_ID=%s\nNET_PREFIX=%s\n' "$NET_ID" "$NET_PREFIX" >"$NETENV"
      return 0
    fi
    id=$(((id + 1) % 65536))
  done
  die "no free 10.x.y.0/24 for the namespace nodes"
}

# The bridge (this namespace, address .1) and one namespace per node, its veth in the bridge.
# The first command that needs the privilege tells whether namespaces are permitted here.
net_up() {
  local br i node ns
  net_choose
  br=$(bridge_name)
  if ! ip link add "$br" type bridge 2>"$LOG/net.log"; then
    cannot "network namespaces for --nodes: 'ip link add $br type bridge' failed:" \
      "$(cat "$LOG/net.log")"
  fi
  {
    ip addr add "$(net_addr 1)/24" dev "$br" && ip link set "$br" up
  } 2>>"$LOG/net.log" || fail "could not configure bridge $br: $(cat "$LOG/net.log")"
  for node in $(ns_nodes); do
    i=${node#node}
    ns=$(ns_name "$node")
    ip netns add "$ns" 2>>"$LOG/net.log" || {
      net_down
      cannot "network namespaces for --nodes: 'ip netns add $ns' failed: $(cat "$LOG/net.log")"
    }
    {
      ip link add "me${NET_ID}v$i" type veth peer name eth0 netns "$ns" &&
        ip link set "me${NET_ID}v$i" master "$br" up &&
        ip -n "$ns" addr add "$(net_addr $((i + 1)))/24" dev eth0 &&
        ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
    } 2>>"$LOG/net.log" || fail "could not wire namespace $ns: $(cat "$LOG/net.log")"
  done
}

# Everything net_up made, found by its names (NET_ID): the processes left in our namespaces
# (jobs' slurmstepd and tasks, which outlive slurmd), the namespaces, the veths and the bridge.
net_down() {
  net_load || return 0
  local ns pids
  for ns in $(ip netns list | awk '{print $1}' | grep -x "multieye-$NET_ID-node[0-9]*"); do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
      # shellcheck disable=SC2086
      kill -TERM $pids 2>/dev/null || true
      wait_for 10 bash -c "[ -z \"\$(ip netns pids $ns)\" ]" || {
        # shellcheck disable=SC2086
        kill -KILL $(ip netns pids "$ns") 2>/dev/null || true
      }
    fi
    ip netns del "$ns" || echo "slurm_cluster.sh: could not delete namespace $ns" >&2
  done
  # A veth goes with its namespace end; delete any left over, then the bridge.
  local links veth
  links=$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//')
  for veth in $(grep -x "me${NET_ID}v[0-9]*" <<<"$links"); do
    ip link del "$veth" 2>/dev/null || true
  done
  if ip link show "$(bridge_name)" >/dev/null 2>&1; then
    ip link del "$(bridge_name)" || echo "slurm_cluster.sh: could not delete $(bridge_name)" >&2
  fi
  rm -f "$NETENV"
}

start_node_slurmds() {
  local node
  for node in $(ns_nodes); do
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup
    # filesystem slurmd insists on finding.
    nsenter --net="/run/netns/$(ns_name "$node")" slurmd -f "$CONF" -N "$node" </dev/null \
      >>"$LOG/slurmd-$node.log" 2>&1 9>&- || fail "slurmd of $node did not start"
  done
}

# ---------------------------------------------------------------------------------- daemons

start_munged() {
  [ -s "$ETC/munge.key" ] || mungekey --create --keyfile="$ETC/munge.key" >/dev/null
  chmod 600 "$ETC/munge.key"
  munged --key-file="$ETC/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$(pidfile munged)" \
    --log-file="$LOG/munged.log" --seed-file="$RUN/munged.seed" \
    </dev/null >>"$LOG/munged.log" 2>&1 9>&- || fail "munged did not start"
  wait_for 10 test -S "$MUNGE_SOCKET" || fail "munged made no socket"
}

db() { mariadb --no-defaults --connect-timeout=5 --socket="$DB_SOCKET" -u root "$@"; }

start_mariadbd() {
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --skip-test-db \
      --auth-root-authentication-method=socket --innodb-log-file-size=16M \
      >>"$LOG/mariadb-install.log" 2>&1 ||
      fail "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  # mariadbd does not daemonize itself; setsid keeps it out of the caller's process group and
  # closed stdio keeps it from holding the caller's pipes open.
  setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DB_SOCKET" \
    --port="$(cat "$ETC/db.port")" --bind-address=127.0.0.1 --pid-file="$(pidfile mariadbd)" \
    --log-error="$LOG/mariadb.log" --skip-name-resolve --performance-schema=OFF \
    --innodb-buffer-pool-size=128M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$LOG/mariadb.log" 2>&1 9>&- &
  wait_for 30 db -e "select 1" || fail "mariadbd did not answer"
  wait_for 5 live_pid mariadbd || fail "mariadbd wrote no pid file"
  local pass
  pass=$(cat "$ETC/db.pass")
  db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
         ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || fail "could not create db user"
}

start_slurmdbd() {
  SLURM_CONF=$CONF slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 9>&- ||
    fail "slurmdbd did not start"
  # The first start creates the tables, which takes a few seconds.
  wait_for 60 env SLURM_CONF="$CONF" sacctmgr -n list cluster || fail "slurmdbd did not answer"
  if [ -z "$(SLURM_CONF=$CONF sacctmgr -n -P list cluster "$CLUSTER" format=cluster)" ]; then
    # Also creates the root account and root's association, which jobs are recorded under.
    SLURM_CONF=$CONF sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster"
  fi
}

# Every node answers and takes jobs: idle, or busy (mix, alloc, comp: jobs ending); not down,
# drained or not responding (a trailing '*').
node_ready() {
  local states
  states=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o %t 2>/dev/null) || return 1
  [ "$(wc -l <<<"$states")" -ge $((1 + $(ns_nodes | wc -l))) ] || return 1
  ! grep -qvE '^(idle|mix|alloc|comp)$' <<<"$states"
}

up() {
  touch "$MARKER"
  local n node
  n=$(running_count)
  if [ "$n" = "$(all_daemons | wc -w)" ] && [ "$(ns_nodes | wc -l)" = "$NODES" ]; then
    # Already up, with the nodes asked for: only check that it answers.
    wait_for 30 node_ready || fail "cluster in $DIR is running but a node is not ready"
    echo "slurm_cluster.sh: already up in $DIR"
    return 0
  fi
  if [ "$n" != 0 ]; then
    echo "slurm_cluster.sh: $n of $(all_daemons | wc -w) daemons alive, $(ns_nodes | wc -l)" \
      "namespace node(s) where $NODES are asked for; restarting the cluster" >&2
    down
  fi
  mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool/$NODE"
  chmod 755 "$DIR" "$RUN" # munged refuses a socket directory others can write to
  rm -f "$RUN"/*.pid "$MUNGE_SOCKET" "$DB_SOCKET"
  local t0=$SECONDS
  net_down # what a crashed cluster may have left
  echo "$NODES" >"$ETC/nodes"
  if [ "$NODES" != 0 ]; then
    net_up
    for node in $(ns_nodes); do mkdir -p "$DIR/spool/$node"; done
  fi
  write_configs
  start_munged
  start_mariadbd
  start_slurmdbd
  SLURM_CONF=$CONF slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.log" 2>&1 9>&- ||
    fail "slurmctld did not start"
  wait_for 30 env SLURM_CONF="$CONF" scontrol ping || fail "slurmctld did not answer"
  SLURM_CONF=$CONF slurmd -f "$CONF" </dev/null >>"$LOG/slurmd-$NODE.log" 2>&1 9>&- ||
    fail "slurmd did not start"
  start_node_slurmds
  wait_for 60 node_ready || fail "the nodes did not become idle within 60 s"
  [ "$(running_count)" = "$(all_daemons | wc -w)" ] || fail "a daemon exited after starting"
  echo "slurm_cluster.sh: up in $DIR in $((SECONDS - t0)) s (SLURM_CONF=$CONF)"
}

# Stop the daemons named, in parallel: TERM, up to 15 s, then KILL. Only pids from our pid files
# that are still the expected program are signalled.
stop_daemons() {
  local name pid pids=()
  for name in "$@"; do
    pid=$(live_pid "$name") && { kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); }
  done
  for pid in "${pids[@]}"; do
    wait_for 15 bash -c "! kill -0 $pid" || {
      echo "slurm_cluster.sh: pid $pid ignored SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait_for 5 bash -c "! kill -0 $pid" || true
    }
  done
  for name in "$@"; do rm -f "$(pidfile "$name")"; done
}

down() {
  [ -d "$RUN" ] || { echo "slurm_cluster.sh: not running ($DIR)"; return 0; }
  # Jobs of this cluster run under slurmstepd processes that outlive slurmd (linuxproc
  # tracking): cancel them while the controller still can, so nothing of ours is left behind.
  if live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null; then
    local jobs
    jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
      wait_for 20 bash -c "[ -z \"\$(SLURM_CONF=$CONF squeue -h -t R,CG -o %A)\" ]" ||
        echo "slurm_cluster.sh: some jobs were still ending" >&2
    fi
  fi
  # Slurm first (slurmctld hands its last records to slurmdbd), then what Slurm relies on.
  local node nodes=()
  for node in $(ns_nodes); do nodes+=("slurmd-$node"); done
  stop_daemons slurmd "${nodes[@]}" slurmctld
  stop_daemons slurmdbd
  stop_daemons mariadbd munged
  net_down
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$DB_SOCKET" "$RUN/munged.seed"
  echo "slurm_cluster.sh: down ($DIR)"
}

status() {
  local d pid n=0
  for d in $(all_daemons); do
    if pid=$(live_pid "$d"); then
      echo "$d: running (pid $pid)"
      n=$((n + 1))
    else
      echo "$d: stopped"
    fi
  done
  if [ "$n" = "$(all_daemons | wc -w)" ]; then
    SLURM_CONF=$CONF sinfo -N -o "%N %P %t %c" 2>/dev/null || true
    echo "running ($DIR)"
  else
    echo "stopped ($DIR)"
    return 1
  fi
}

# up, down and purge hold a lock on the state directory, so that two of them (two test sessions
# sharing $MULTIEYE_SLURM_DIR) never interleave. The daemons are started with fd 9 closed: the
# lock must not outlive this script.
lock() {
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock -w 300 9 || die "another slurm_cluster.sh holds $DIR/.lock"
}

case "${1:-}" in
  up)
    if [ "${2:-}" = --nodes ]; then NODES=${3:-}; fi
    if [ -z "$NODES" ]; then
      NODES=0
      [ "$(running_count)" = 0 ] || NODES=$(ns_nodes | wc -l)
    fi
    if ! [[ $NODES =~ ^[0-9]+$ ]] || ((NODES > 16)); then
      echo "slurm_cluster.sh: --nodes (or MULTIEYE_SLURM_NODES) must be 0..16, not '$NODES'" >&2
      exit 2
    fi
    check_can_boot && lock && up
    ;;
  down)
    [ -d "$DIR" ] || { echo "slurm_cluster.sh: not running ($DIR)"; exit 0; }
    lock
    down
    ;;
  status) status ;;
  env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
  purge)
    [ -d "$DIR" ] || exit 0
    lock
    down
    # Everything, the database and the munge key included; only our own directory.
    if [ -f "$MARKER" ]; then rm -rf "$DIR"; fi
    ;;
  *)
    echo "usage: $0 up [--nodes N]|down|status|env|purge   (state in \$MULTIEYE_SLURM_DIR, now $DIR)" >&2
    exit 2
    ;;
esac
