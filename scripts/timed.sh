# Sourced by the results scripts. timed NAME COMMAND...: run COMMAND once, keeping its full log in
# $OUT/NAME.log, print the log lines matching $SHOW and the wall time, and mark it done so that
# rerunning the script skips it.
timed() {
  local name=$1 start
  shift
  if [ -e "$OUT/$name.done" ]; then return; fi  # finished in an earlier invocation
  start=$(date +%s)
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  grep -E "$SHOW" "$OUT/$name.log" || true
  echo "== $name: $(($(date +%s) - start)) s"
  touch "$OUT/$name.done"
}
