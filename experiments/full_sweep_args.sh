# Issue 10's whole grid and its fastest measured settings, as sweep.py arguments (sourced by gpu_full_sweep.sh and
# gpu_sweep_bg.sh, so the chunked and the continuous timing run the same sweep): 8 methods x 5 tasks x K
# 100/500/1000 x 5 seeds, queued groups of up to QUEUE (MAXRUNS at a time), longest first by the earlier records,
# WPD group workers under MPS, graphed grouped steps, bf16. Run from the repository root (or a copy of it).
FULL_SWEEP=(--mode grouped --ks 100,500,1000 --tasks cola,sst2,mrpc,stsb,rte --seeds 111,222,333,444,555
  --max-runs "${MAXRUNS:-12}" --queue "${QUEUE:-18}" --costs-from experiments/results/low_resource_minilm/runs
  --workers-per-device "${WPD:-5}" --mps on
  --set model.path=.dev/minilm --set data.dir=.dev/glue --set train.mixed_precision=bf16
  --set train.eval_batch_size=256 --set train.checkpoint_every_s=120 --set train.cuda_graph=false
  --set group.cuda_graph=true)
