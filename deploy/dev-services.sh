#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ are running on this machine with the
# defaults Scramjet expects:
#
#   postgres://postgres@127.0.0.1:5432   (user postgres, no password)
#   amqp://guest:guest@127.0.0.1:5672/%2f
#
# Starts them if they are installed, installs them from the distribution's
# packages (Debian/Ubuntu apt-get) if they are not. Idempotent; prints nothing
# when all is well. Meant for development machines and CI, not production:
# on a fresh Debian PostgreSQL it lets the postgres user in over 127.0.0.1
# and ::1 without a password ("trust"), which is what the default URL needs.
set -euo pipefail

say() { echo "dev-services: $*" >&2; }
die() { say "$*"; exit 1; }

# shellcheck source=deploy/apt.sh
. "$(dirname "$0")/apt.sh"
if [ "$(id -u)" -eq 0 ]; then
    as_postgres() { runuser -u postgres -- "$@"; }
else
    command -v sudo >/dev/null || die "need root or sudo to start or install services"
    as_postgres() { sudo -u postgres "$@"; }
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    return 1
}


pg_ok() {
    PGCONNECT_TIMEOUT=5 psql -w -X -q "postgres://postgres@127.0.0.1:5432/postgres" -tAc 'SELECT 1' </dev/null >/dev/null 2>&1
}

ensure_postgres() {
    if ! command -v pg_lsclusters >/dev/null; then
        apt_install postgresql postgresql-client
    fi
    if ! port_open 5432; then
        if [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
            local version
            version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
            say "creating PostgreSQL $version cluster main"
            as_root pg_createcluster "$version" main >/dev/null
        fi
        local version name _rest
        while read -r version name _rest; do
            say "starting PostgreSQL $version/$name"
            as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start || true
        done < <(pg_lsclusters -h)
        wait_port 5432 30 || die "PostgreSQL did not open 127.0.0.1:5432"
    fi
    if ! pg_ok; then
        # A fresh Debian cluster asks for a password on TCP; let the postgres
        # user in from loopback (first matching pg_hba line wins).
        local hba
        hba=$(as_postgres psql -X -tAc 'SHOW hba_file' </dev/null) || die "cannot reach PostgreSQL over its socket to configure it"
        say "allowing user postgres from 127.0.0.1 and ::1 without a password ($hba)"
        as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
        as_postgres psql -X -tAc 'SELECT pg_reload_conf()' </dev/null >/dev/null
        local i
        for ((i = 0; i < 50; i++)); do
            pg_ok && break
            sleep 0.1
        done
        pg_ok || die "PostgreSQL still refuses postgres://postgres@127.0.0.1:5432"
    fi
}

# The tests rotate the password of a role of their own under the daemon, so
# PostgreSQL must check passwords for such roles: members of
# scramjet_password_auth log in over loopback with scram-sha-256 (a line put
# before the trust lines; everyone else is unaffected).
ensure_password_auth_role() {
    local hba
    hba=$(as_postgres psql -X -tAc 'SHOW hba_file' </dev/null) || die "cannot reach PostgreSQL over its socket to configure it"
    as_postgres psql -X -q -tAc "DO \$\$ BEGIN CREATE ROLE scramjet_password_auth NOLOGIN; \
        EXCEPTION WHEN duplicate_object THEN NULL; END \$\$" </dev/null >/dev/null
    if ! as_root grep -q '+scramjet_password_auth' "$hba"; then
        say "checking passwords of members of scramjet_password_auth over loopback ($hba)"
        as_root sed -i '1i host all +scramjet_password_auth 127.0.0.1/32 scram-sha-256\nhost all +scramjet_password_auth ::1/128 scram-sha-256' "$hba"
        as_postgres psql -X -tAc 'SELECT pg_reload_conf()' </dev/null >/dev/null
    fi
}

ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
        apt_install rabbitmq-server
    fi
    if ! port_open 5672; then
        say "starting RabbitMQ"
        as_root rabbitmq-server -detached >/dev/null 2>&1 || true
        as_root timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
        wait_port 5672 60 || die "RabbitMQ did not open 127.0.0.1:5672"
    fi
    # amqp.partitions > 1 declares an x-consistent-hash exchange
    # (docs/scale-out.md); the plugin ships with RabbitMQ. Enabling an
    # enabled plugin changes nothing, but costs a second: look first.
    if ! as_root rabbitmq-plugins list -q -e rabbitmq_consistent_hash_exchange 2>/dev/null \
        | grep -q rabbitmq_consistent_hash_exchange; then
        say "enabling the RabbitMQ plugin rabbitmq_consistent_hash_exchange"
        as_root rabbitmq-plugins enable -q rabbitmq_consistent_hash_exchange >/dev/null \
            || die "cannot enable rabbitmq_consistent_hash_exchange"
    fi
}

ensure_postgres
ensure_password_auth_role
ensure_rabbitmq
