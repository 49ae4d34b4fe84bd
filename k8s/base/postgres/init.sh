#!/bin/sh
# First start only (the image runs this on an empty data directory): a
# login and a database per service, each owning only its own database.
set -eu
for svc in auth inventory payments orders; do
  var=$(echo "$svc" | tr a-z A-Z)_DB_PASSWORD
  eval "password=\${$var}"
  psql -v ON_ERROR_STOP=1 --username postgres <<SQL
CREATE ROLE $svc LOGIN PASSWORD '$password';
CREATE DATABASE $svc OWNER $svc;
REVOKE ALL ON DATABASE $svc FROM PUBLIC;
SQL
done
