#!/bin/bash
# The body of slurm/train.sbatch and slurm/train_multinode.sbatch (sourced, not submitted):
# environment, run directory, launch, stop signals and requeue. See docs/hpc.md.
#
#   sbatch slurm/train.sbatch CONFIG [key=value ...]
#
# Environment it reads (all optional):
#   HPCAUX_HOME      the hpcaux checkout (default: the directory sbatch was called from)
#   HPCAUX_ENV       a file to source first: module loads, a venv (default: scripts/env.sh)
#   HPCAUX_RUNS      where run directories go; the run is $HPCAUX_RUNS/$SLURM_JOB_ID (default ./runs)
#   HPCAUX_LAUNCHER  srun (default) or mpirun (inside the allocation, for sites without PMIx)
#   HPCAUX_SRUN_MPI  srun's --mpi plugin (default pmix)
#   HPCAUX_MAX_REQUEUES  how often a job may requeue itself (default 20)
set -uo pipefail

config=${1:?usage: sbatch slurm/train.sbatch CONFIG [key=value ...]}
shift
HPCAUX_HOME=${HPCAUX_HOME:-$SLURM_SUBMIT_DIR}
# shellcheck disable=SC1090
source "${HPCAUX_ENV:-$HPCAUX_HOME/scripts/env.sh}"
run_dir=${HPCAUX_RUNS:-$SLURM_SUBMIT_DIR/runs}/$SLURM_JOB_ID
mkdir -p "$run_dir/logs"
restarts=${SLURM_RESTART_COUNT:-0}

# A requeued job continues its own run; D follows the task count (parallel.D=0).
if [ -e "$run_dir/ckpt/latest" ]; then
  train_args=(--resume "$run_dir" "$@")
elif [ "$restarts" -gt 0 ]; then  # the first attempt stopped before its first checkpoint
  train_args=(--config "$config" --out "$run_dir" --overwrite parallel.D=0 "$@")
else
  train_args=(--config "$config" --out "$run_dir" parallel.D=0 "$@")
fi

latest_before=$(readlink "$run_dir/ckpt/latest" 2>/dev/null || true)
echo "hpcaux job $SLURM_JOB_ID (restart $restarts): $SLURM_NTASKS ranks on $SLURM_JOB_NODELIST, run $run_dir"
case ${HPCAUX_LAUNCHER:-srun} in
  srun)
    srun --mpi="${HPCAUX_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --open-mode=append \
         --output="$run_dir/logs/rank-%t.log" hpcaux train "${train_args[@]}" &
    ;;
  mpirun)
    # SLURM's SIGTERM (time limit, scancel) reaches mpirun too, which then aborts the job
    # and kills the ranks odls_base_sigkill_timeout seconds later (Open MPI: 1 s). Give
    # them the time to finish the step and save (SLURM's KillWait is 30 s by default).
    OMPI_MCA_odls_base_sigkill_timeout=${OMPI_MCA_odls_base_sigkill_timeout:-25} \
      hpcaux launch mpirun -np "$SLURM_NTASKS" --bind-to none --output-filename "$run_dir/logs" \
      hpcaux train "${train_args[@]}" &
    ;;
  *)
    echo "hpcaux job: HPCAUX_LAUNCHER must be srun or mpirun, not '$HPCAUX_LAUNCHER'" >&2
    exit 2
    ;;
esac
launcher=$!

# SIGUSR1 for the batch shell (--signal=B:USR1@T, or scancel --signal=USR1 --batch) goes on
# to the ranks through the launcher; srun and `hpcaux launch` forward it. SIGTERM is not
# forwarded: SLURM already sends it to every task, and the ranks save on the first one.
stop_signal=""
trap 'stop_signal=USR1; kill -USR1 "$launcher" 2>/dev/null' USR1
trap 'stop_signal=TERM' TERM
while true; do
  wait "$launcher"
  status=$?
  kill -0 "$launcher" 2>/dev/null || break  # wait returned for a trapped signal, not the exit
done
echo "hpcaux job: training exited with status $status${stop_signal:+ after SIG$stop_signal}; rank logs in $run_dir/logs"

if [ -f "$run_dir/summary.json" ]; then
  exit 0
fi
# After SIGTERM mpirun exits 1 even when every rank saved and exited 0: a new stop
# checkpoint is what tells a clean stop from a failure.
saved=$(readlink "$run_dir/ckpt/latest" 2>/dev/null || true)
if [ "$stop_signal" = TERM ] && [ "$saved" != "$latest_before" ] && [[ $saved == stop_step_* ]]; then
  echo "hpcaux job: stopped by SIGTERM with $saved saved; resubmit with the same run directory to resume"
  exit 0
fi
# Exit status 0 without a summary: the ranks saved a checkpoint on a stop signal. After
# SIGTERM (time limit, scancel) SLURM is ending the job: requeueing is its call, not ours.
if [ "$status" -eq 0 ] && [ "$stop_signal" != TERM ] && [ "$restarts" -lt "${HPCAUX_MAX_REQUEUES:-20}" ]; then
  echo "hpcaux job: requeueing $SLURM_JOB_ID to resume from $(readlink "$run_dir/ckpt/latest")"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
