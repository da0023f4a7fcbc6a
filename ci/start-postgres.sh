#!/usr/bin/env bash
# Start this machine's PostgreSQL cluster when it is installed and not running.
set -euo pipefail

if ! command -v pg_lsclusters >/dev/null 2>&1; then
    echo "no pg_lsclusters here; the tests will use an embedded PostgreSQL" >&2
    exit 0
fi

version=$(ls /etc/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters --no-header | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q online; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi

for _ in $(seq 1 50); do
    pg_isready -q -h 127.0.0.1 -p 5432 && exit 0
    sleep 0.2
done
echo "PostgreSQL $version did not become ready on 127.0.0.1:5432" >&2
exit 1
