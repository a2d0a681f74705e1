# Sourced by backfill.sh and verify.sh: the connection options they both take, and the mariadb
# (or mysql) command line built from them.

database="" socket="" host="" port="" user="" extra=""

# Sets connection option $1 (-D/--database, -S/--socket, -h/--host, -P/--port, -u/--user or
# --defaults-extra-file) to $2.
kit_connection_option() {
  case "$1" in
    -D|--database) database=$2 ;;
    -S|--socket) socket=$2 ;;
    -h|--host) host=$2 ;;
    -P|--port) port=$2 ;;
    -u|--user) user=$2 ;;
    --defaults-extra-file) extra=$2 ;;
  esac
}

# Sets the array `db` to the client command line; exits 2 when there is no client or the
# database does not answer. $1 names the caller in messages.
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
