#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for development and tests.
#
#   bash launch/slurm_cluster.sh up|down|status|env|purge
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
# Exit codes: 0 ok; 1 failure (with the daemon logs' tails); 3 Slurm cannot be booted here
# (not root, or packages missing: run install.sh as root), which tests turn into a skip.
set -euo pipefail

DIR=${MULTIEYE_SLURM_DIR:-/tmp/multieye-slurm}
CLUSTER=multieye
PARTITION=debug
MARKER=$DIR/.multieye-slurm # `purge` only deletes a directory that carries it
ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
CONF=$ETC/slurm.conf
MUNGE_SOCKET=$RUN/munge.socket.2
DB_SOCKET=$RUN/mariadb.sock
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
cannot() { echo "slurm_cluster.sh: cannot boot Slurm here: $*" >&2; exit 3; }

pidfile() { echo "$RUN/$1.pid"; }

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
  [ "${exe% (deleted)}" = "$(readlink -f "$(command -v "$1")")" ] || return 1
  echo "$pid"
}

running_count() {
  local n=0 d
  for d in "${DAEMONS[@]}"; do live_pid "$d" >/dev/null && n=$((n + 1)); done
  echo "$n"
}

check_can_boot() {
  [ "$(id -u)" = 0 ] || cannot "not root (the daemons run as root; uid $(id -u))"
  local missing=() b
  for b in flock munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd \
    sbatch sinfo squeue scontrol scancel sacct sacctmgr ss; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
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
  local host node_line mem rmem ctld_port slurmd_port dbd_port db_port
  host=$(hostname -s)
  # slurmd -C prints the node as slurmd itself will detect it (name, sockets, cores, threads,
  # memory); the name must match or slurmd refuses to start.
  node_line=$(slurmd -C | head -n 1)
  [[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  # A little below the total so that the node is not drained for having less than configured.
  rmem=$((mem * 9 / 10))
  node_line=${node_line/RealMemory=$mem/RealMemory=$rmem}
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  dbd_port=$(free_port)
  db_port=$(free_port)
  [ -s "$ETC/db.pass" ] ||
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$ETC/db.pass")

  cat >"$CONF" <<EOF
# Written by launch/slurm_cluster.sh; rewritten on every 'up' from a stopped cluster.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
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
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
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
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

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

# The node answers and takes jobs: idle, or busy (mix, alloc, comp: jobs ending); not down,
# drained or not responding (a trailing '*').
node_ready() {
  local state
  state=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o %t 2>/dev/null | head -n 1)
  [[ $state =~ ^(idle|mix|alloc|comp)$ ]]
}

up() {
  touch "$MARKER"
  local n
  n=$(running_count)
  if [ "$n" = ${#DAEMONS[@]} ]; then
    # Already up: only check that it answers.
    wait_for 30 node_ready || fail "cluster in $DIR is running but its node is not ready"
    echo "slurm_cluster.sh: already up in $DIR"
    return 0
  fi
  if [ "$n" != 0 ]; then
    echo "slurm_cluster.sh: $n of ${#DAEMONS[@]} daemons alive; restarting the cluster" >&2
    down
  fi
  mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool"
  chmod 755 "$DIR" "$RUN" # munged refuses a socket directory others can write to
  rm -f "$RUN"/*.pid "$MUNGE_SOCKET" "$DB_SOCKET"
  local t0=$SECONDS
  write_configs
  start_munged
  start_mariadbd
  start_slurmdbd
  SLURM_CONF=$CONF slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.log" 2>&1 9>&- ||
    fail "slurmctld did not start"
  wait_for 30 env SLURM_CONF="$CONF" scontrol ping || fail "slurmctld did not answer"
  SLURM_CONF=$CONF slurmd -f "$CONF" </dev/null >>"$LOG/slurmd.log" 2>&1 9>&- ||
    fail "slurmd did not start"
  wait_for 60 node_ready || fail "node did not become idle within 60 s"
  [ "$(running_count)" = ${#DAEMONS[@]} ] || fail "a daemon exited after starting"
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
  stop_daemons slurmd slurmctld
  stop_daemons slurmdbd
  stop_daemons mariadbd munged
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$DB_SOCKET" "$RUN/munged.seed"
  echo "slurm_cluster.sh: down ($DIR)"
}

status() {
  local d pid n=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$d"); then
      echo "$d: running (pid $pid)"
      n=$((n + 1))
    else
      echo "$d: stopped"
    fi
  done
  if [ "$n" = ${#DAEMONS[@]} ]; then
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
  up) check_can_boot && lock && up ;;
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
    echo "usage: $0 up|down|status|env|purge   (state in \$MULTIEYE_SLURM_DIR, now $DIR)" >&2
    exit 2
    ;;
esac
