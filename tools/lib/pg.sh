# Private PostgreSQL clusters for tools/dev and tools/test. Source this file.
#
# PostgreSQL refuses to run as root, so when we are root the cluster runs as the 'postgres'
# system user (created by Debian's postgresql package, or here if it is missing).

pg_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir)
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

pg_ensure_installed() {
  if pg_bindir >/dev/null; then return 0; fi
  echo "installing PostgreSQL (Debian package postgresql)" >&2
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
  pg_bindir >/dev/null
}

apt_update_once() {
  if [ -z "${TOLLGATE_APT_UPDATED:-}" ]; then
    apt-get update -q >&2
    export TOLLGATE_APT_UPDATED=1
  fi
}

# pg_as_owner CMD...: runs CMD as the cluster's owner.
pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_ensure_user() {
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
}

# pg_free_port: a TCP port nothing listens on right now (the kernel picks it).
pg_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# pg_start DIR PORT: creates (if needed) and starts a cluster in DIR listening on 127.0.0.1:PORT,
# with a superuser 'tollgate_admin' (trust auth on loopback: throwaway/dev clusters only) and a
# login role 'tollgate' (CREATEROLE, not superuser) owning database 'tollgate'.
# TOLLGATE_PG_OPTIONS adds server settings ("-c name=value ...").
pg_start() {
  local dir=$1 port=$2 bin
  bin=$(pg_bindir)
  pg_ensure_user
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; chmod 700 "$dir"; fi
  if [ ! -f "$dir/PG_VERSION" ]; then
    pg_as_owner "$bin/initdb" -D "$dir" -U tollgate_admin --auth=trust --encoding=UTF8 --locale=C >"$dir.initdb.log" 2>&1 || {
      cat "$dir.initdb.log" >&2; return 1; }
  fi
  pg_as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=${TOLLGATE_PG_FSYNC:-on} -c max_connections=${TOLLGATE_PG_MAX_CONNECTIONS:-300} ${TOLLGATE_PG_OPTIONS:-}" \
    start >/dev/null || { tail -n 30 "$dir/server.log" >&2; return 1; }
  "$bin/psql" -h 127.0.0.1 -p "$port" -U tollgate_admin -d postgres -v ON_ERROR_STOP=1 -q <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tollgate') THEN
    CREATE ROLE tollgate LOGIN CREATEROLE CREATEDB PASSWORD 'tollgate';
  END IF;
END $$;
SELECT 'CREATE DATABASE tollgate OWNER tollgate'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tollgate') \gexec
SQL
}

# pg_stop DIR
pg_stop() {
  local dir=$1 bin
  bin=$(pg_bindir) || return 0
  if [ -f "$dir/postmaster.pid" ]; then
    pg_as_owner "$bin/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null 2>&1 || true
  fi
}
