# Sourced by the kit's scripts: the connection options they all take, the mariadb (or mysql)
# command line built from them, and a retry of statement batches.

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

# Runs the statement batch $2 and prints its output, running it again after a deadlock or a lock
# wait timeout (InnoDB rolled it back whole), up to 100 times; any other error is printed with
# "$1: $3 failed" and ends the script with exit 1.
kit_retried() {
  local name=$1 sql=$2 what=$3 out tries=0
  while :; do
    if out=$("${db[@]}" -e "$sql" 2>&1); then
      printf '%s\n' "$out"
      return 0
    fi
    tries=$((tries + 1))
    if grep -qE 'ERROR (1213|1205)' <<<"$out" && [ "$tries" -lt 100 ]; then
      sleep 0.$((RANDOM % 5 + 1))
      continue
    fi
    echo "$name: $what failed: $out" >&2
    exit 1
  done
}
