# Sourced by the results scripts (which set OUT, PY and GROUPS_TO_RUN). timed NAME COMMAND...: run COMMAND once, keeping its full log in
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

# train NAME OUTPUT CONFIG: fit CONFIG once; a run whose OUTPUT folder exists is kept (the
# configs never overwrite one)
train() {
  local name=$1 output=$2 config=$3
  if [ -e "$output" ]; then echo "== $name: $output exists, kept"; return; fi
  timed "$name" $PY -m lightning_moe fit --config "$config"
}

# fit NAME SEED ARGS...: one run in $OUT/NAME/s<SEED>
fit() {
  local name=$1 seed=$2
  shift 2
  timed "$name-s$seed" $PY -m lightning_moe fit "$@" --seed_everything="$seed" \
    --trainer.logger.init_args.save_dir=$OUT --trainer.logger.init_args.name="$name" \
    --trainer.logger.init_args.version="s$seed"
}
# fit_and_test NAME SEED CONFIG ARGS...: fit in $OUT/NAME/seedSEED (the config's save_dir must be
# $OUT), then test its exported adapter in $OUT/NAME/seedSEED-test
fit_and_test() {
  local name=$1 seed=$2 config=$3
  shift 3
  timed "$name-seed$seed-fit" $PY -m lightning_moe fit --config "$config" --seed_everything="$seed" \
    --trainer.logger.init_args.name="$name" --trainer.logger.init_args.version="seed$seed" "$@"
  timed "$name-seed$seed-test" $PY -m lightning_moe test --config "$config" "$@" \
    --trainer.logger.init_args.name="$name" --trainer.logger.init_args.version="seed$seed-test" \
    --model.init_args.adapter_path="$OUT/$name/seed$seed/adapter"
}
wants() { [[ " ${GROUPS_TO_RUN[*]} " == *" $1 "* ]]; }
