# Sourced by backfill.sh and verify.sh: the mariadb (or mysql) command line for the connection
# options they parse (database, socket, host, port, user, extra). Sets the array `db`; exits 2
# when there is no client or the database does not answer. $1 names the caller in messages.
kit_connect() {
  local name=$1 client
  client=$(command -v mariadb || command -v mysql || true)
  [ -n "$client" ] || { echo "$name: no mariadb or mysql client on PATH" >&2; exit 2; }
  db=("$client")
  [ -z "$extra" ] || db+=("--defaults-extra-file=$extra")
  [ -z "$socket" ] || db+=("--socket=$socket")
  [ -z "$host" ] || db+=("--host=$host")
  [ -z "$port" ] || db+=("--port=$port")
  [ -z "$user" ] || db+=("--user=$user")
  db+=(--batch --skip-column-names "--database=$database")
  "${db[@]}" -e "SELECT 1" >/dev/null || { echo "$name: cannot connect to database '$database'" >&2; exit 2; }
}
