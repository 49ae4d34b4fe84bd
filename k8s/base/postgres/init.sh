#!/bin/sh
# First start only (the image runs this on an empty data directory): a
# login and a database per service, each owning only its own database.
# Passwords reach SQL only as psql variables (:'password' is quoted as a
# literal, :"svc" as an identifier), never pasted into the SQL text, so a
# password holding a quote cannot change the statement.
set -eu
for svc in auth inventory payments orders recommendations; do
  var=$(echo "$svc" | tr a-z A-Z)_DB_PASSWORD
  password=$(printenv "$var") || { echo "init.sh: $var is not set" >&2; exit 1; }
  psql -v ON_ERROR_STOP=1 --username postgres -v svc="$svc" -v password="$password" <<'SQL'
CREATE ROLE :"svc" LOGIN PASSWORD :'password';
CREATE DATABASE :"svc" OWNER :"svc";
REVOKE ALL ON DATABASE :"svc" FROM PUBLIC;
SQL
done
