# Sourced by the demo scripts: `stage NAME DONE_FILE CMD...` runs CMD unless DONE_FILE exists, and prints and
# records (in $TIMINGS) how long it took. $TAG prefixes the printed lines.
stage() {
  local name=$1 done=$2 t0=$SECONDS
  shift 2
  if [ -e "$done" ]; then echo "[$TAG] $name: reused"; echo "$name: reused" >> "$TIMINGS"; return; fi
  "$@"
  echo "[$TAG] $name: $((SECONDS - t0)) s"
  echo "$name: $((SECONDS - t0)) s" >> "$TIMINGS"
}
