# Shared by job-started.sh, job-completed.sh (the runner's user) and ringfence-runner-job
# (root, through sudo): the settings file and the job's id. Sourced, never run.
# shellcheck shell=bash disable=SC2034 # the CFG_ settings are read by the scripts that source this

# Built-in defaults; runner-hooks.conf overrides them.
CFG_RINGFENCE=/usr/local/bin/ringfence
CFG_SOCKET=/run/ringfence/control.sock
# block | audit | empty (the job's policy decides). "block" also stops a repository's policy
# from switching the job to audit mode.
CFG_MODE=
# workspace: a job's $GITHUB_WORKSPACE/.github/ringfence.toml, when present at job start,
# replaces the default policy. off: the default policy always.
CFG_REPO_POLICY=workspace
CFG_DEFAULT_POLICY=/etc/ringfence/default-policy.toml
# What Runner.Worker itself must reach: it is inside the job (so is everything it starts),
# and it streams logs and results to GitHub while the job runs. Added to every job's
# policy. GitHub documents these as required for self-hosted runners.
CFG_RUNNER_ALLOW='github.com:443 api.github.com:443 *.actions.githubusercontent.com:443 productionresultssa*.blob.core.windows.net:443'
# DNS servers jobs may use (space-separated); empty: the policy's, else the daemon's
# /etc/resolv.conf.
CFG_DNS_RESOLVERS=
# The root helper's log (job starts, and the job ends it does when Runner.Worker exits).
CFG_LOG=/var/log/ringfence-runner-job.log

# The settings file: runner-hooks.conf beside these scripts (a self-contained install
# directory), else /etc/ringfence/runner-hooks.conf. KEY=value lines; '#' starts a comment
# line; values may be quoted.
rf_config_file() {
  local dir=$1
  if [ -e "$dir/runner-hooks.conf" ]; then
    echo "$dir/runner-hooks.conf"
  elif [ -e /etc/ringfence/runner-hooks.conf ]; then
    echo /etc/ringfence/runner-hooks.conf
  fi
}

# Fails (non-zero, message on stderr) when the file is not root's or others may write it:
# root acts on what it says.
rf_root_owned() {
  local f=$1 owner mode
  owner=$(stat -L -c %u "$f" 2>/dev/null) || { echo "cannot stat $f" >&2; return 1; }
  mode=$(stat -L -c %a "$f")
  if [ "$owner" != 0 ] || (( (8#$mode & 8#022) != 0 )); then
    echo "$f must be owned by root and writable by root only (owner uid $owner, mode $mode)" >&2
    return 1
  fi
}

rf_load_config() {
  local f=$1 line key val n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if ! [[ $line =~ ^[[:space:]]*([A-Z_]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])?[[:space:]]*$ ]]; then
      echo "$f:$n: expected KEY=value, found: $line" >&2
      return 1
    fi
    key=${BASH_REMATCH[1]}
    val=${BASH_REMATCH[2]}
    if [[ $val =~ ^\"(.*)\"$ ]] || [[ $val =~ ^\'(.*)\'$ ]]; then
      val=${BASH_REMATCH[1]}
    fi
    case $key in
      RINGFENCE | SOCKET | MODE | REPO_POLICY | DEFAULT_POLICY | RUNNER_ALLOW | DNS_RESOLVERS | LOG)
        printf -v "CFG_$key" '%s' "$val" ;;
      *)
        echo "$f:$n: unknown setting $key (RINGFENCE, SOCKET, MODE, REPO_POLICY, DEFAULT_POLICY, RUNNER_ALLOW, DNS_RESOLVERS, LOG)" >&2
        return 1 ;;
    esac
  done <"$f"
  case $CFG_MODE in '' | audit | block) ;; *)
    echo "$f: MODE=$CFG_MODE: expected block, audit or nothing" >&2; return 1 ;;
  esac
  case $CFG_REPO_POLICY in workspace | off) ;; *)
    echo "$f: REPO_POLICY=$CFG_REPO_POLICY: expected workspace or off" >&2; return 1 ;;
  esac
}

# The ringfence job id of this GitHub job: run id, attempt, job key and runner name (a
# matrix runs one job key several times at once, on different runners). Job ids allow
# letters, digits, '.', '_', '-', up to 128 characters.
rf_job_id() {
  local raw="gh-${GITHUB_RUN_ID:-0}.${GITHUB_RUN_ATTEMPT:-1}-${GITHUB_JOB:-job}-${RUNNER_NAME:-runner}"
  local id=${raw//[^A-Za-z0-9._-]/_}
  if [ ${#id} -gt 128 ]; then
    local sum
    sum=$(printf '%s' "$raw" | cksum | cut -d' ' -f1)
    id="${id:0:116}-$(printf '%010d' "$sum")"
  fi
  printf '%s\n' "$id"
}

# The mode a policy file asks for: block, audit (also when it names none: the policy
# default), or "unknown" when it cannot be read (callers treat that as block).
rf_policy_mode() {
  local f=$1 m
  [ -r "$f" ] || { echo unknown; return; }
  m=$(sed -n -E "s/^[[:space:]]*mode[[:space:]]*=[[:space:]]*[\"']([a-z]+)[\"'][[:space:]]*(#.*)?$/\1/p" "$f" | head -n1)
  case $m in block | audit) echo "$m" ;; '') echo audit ;; *) echo unknown ;; esac
}
