#!/usr/bin/env bash
# Issue 10's whole sweep as ONE continuous run that outlives a device call (at most 10 minutes each). The sweep
# starts in a process session of its own (setsid), which the device tool leaves running when the call returns; it
# runs from a self-contained copy at $BG (package, configs, scripts, installed wheels, data, model), so the next
# call's fresh copy of the working tree and its wheel install cannot touch the files it imports and reads.
#   STEP=start bash experiments/gpu_sweep_bg.sh   copy, start, then watch for up to WATCH seconds
#   STEP=watch bash experiments/gpu_sweep_bg.sh   watch (next call, back to back) until the sweep ends or WATCH passes
# Each call copies the sweep's output so far into $OUT; once it has ended, also its wall time (date stamps taken by
# the session itself around sweep.py) and the records. The grid and settings are full_sweep_args.sh's; EXTRA adds
# sweep.py arguments. Needs root on the device (an ordinary user's processes all end with the call) and, for
# STEP=start, .whl installed in /tmp/site and .dev/minilm + .dev/glue (prepare_device.sh).
set -u
out=${OUT:-bg_out}; mkdir -p "$out"
bg=${BG:-/var/tmp/unipelt_bg}
if [ "${STEP:-start}" = start ]; then
  [ -e "$bg/t0" ] && [ ! -e "$bg/t1" ] && { echo "a sweep is already running in $bg"; exit 1; }
  rm -rf "$bg"; mkdir -p "$bg/.dev"
  cp -r unipelt conf hydra_plugins experiments "$bg/"; cp -r /tmp/site "$bg/site"
  cp -r .dev/minilm .dev/glue "$bg/.dev/"
  cat > "$bg/sweep.sh" <<EOF
cd "$bg"
export PYTHONPATH="$bg/site:$bg" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > util.txt &
smi=\$!
date +%s.%N > t0
MAXRUNS=${MAXRUNS:-12} QUEUE=${QUEUE:-18} WPD=${WPD:-5}
source experiments/full_sweep_args.sh
python3 experiments/sweep.py --runs-dir runs "\${FULL_SWEEP[@]}" --log log.jsonl ${EXTRA:-} > sweep.txt 2>&1
echo \$? > rc
date +%s.%N > t1
kill \$smi
EOF
  setsid nohup bash "$bg/sweep.sh" > "$bg/session.txt" 2>&1 < /dev/null &
  echo "started in $bg (pid $!)"
fi
complete() {
  python3 -c "import glob,json,sys; print(sum(1 for p in glob.glob(sys.argv[1]+'/*/record.json')
    if json.load(open(p)).get('status') == 'complete'))" "$bg/runs"
}
t=0; watch=${WATCH:-560}
while [ ! -e "$bg/t1" ] && [ "$t" -lt "$watch" ]; do
  sleep 5; t=$((t + 5))
  [ $((t % 60)) = 0 ] && echo "watch ${t}s: $(complete) runs complete"
done
cp "$bg"/sweep.txt "$bg"/log.jsonl "$bg"/util.txt "$bg"/session.txt "$out/" 2>/dev/null
if [ -e "$bg/t1" ]; then
  python3 - "$bg" <<'PY' | tee "$out/sweep.json"
import glob, json, sys
bg = sys.argv[1]
t0, t1 = (float(open(f"{bg}/{n}").read()) for n in ("t0", "t1"))
busy = [int(l.split(",")[1]) for l in open(f"{bg}/util.txt") if l.count(",") == 2]
done = sum(1 for p in glob.glob(f"{bg}/runs/*/record.json") if json.load(open(p)).get("status") == "complete")
print(json.dumps({"wall_s": round(t1 - t0, 1), "complete": done, "rc": int(open(f"{bg}/rc").read()),
                  "gpu_busy_mean_pct": round(sum(busy) / max(1, len(busy)), 1)}))
PY
  tar czf "$out/records.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules -C "$bg" runs
  grep -v "Loading weights" "$bg/sweep.txt" | grep -v "^done " | tail -n 6
else
  echo "still running after this call's watch: $(complete) runs complete"
fi
