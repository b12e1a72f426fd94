#!/usr/bin/env bash
# The main job on a SLURM cluster, one task per GPU over any number of nodes, requeued when it is
# preempted or reaches its time limit, until the run is done.
#
#   sbatch --nodes=2 scripts/slurm_train.sh recipes/r50_selfcon.yaml data.train=/data/in/train data.val=/data/in/val
#
# srun starts the trainers itself (no `accelerate launch`): every process gets RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which is all Accelerate needs, and SLURM's signals reach
# the trainers directly. SIGUSR1 arrives 5 minutes before the time limit (--signal), SIGTERM on
# preemption: every process stops at the same step with a checkpoint of it and exits 138 / 143;
# this script then requeues the job, which resumes from that step (run.resume=auto).
#SBATCH --job-name=fasttrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch [--nodes=N] scripts/slurm_train.sh RECIPE [key=value ...]" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# SLURM sends SIGTERM to this shell too: wait for the trainers' checkpoint instead of dying first
trap 'echo "fasttrain: SIGTERM: waiting for the trainers to write their checkpoint"' TERM

# one task per GPU; each maps SLURM's numbering onto the variables torch.distributed reads
srun --kill-on-bad-exit=0 bash -c '
  export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
  exec .venv/bin/python fasttrain/run.py "$@" run.resume=auto
' fasttrain "$@"
status=$?

case $status in
  138|143)  # stopped with a checkpoint of the exact step: continue in a new allocation
    echo "fasttrain: job $SLURM_JOB_ID stopped for preemption (exit $status): requeued"
    scontrol requeue "$SLURM_JOB_ID"
    ;;
  0) echo "fasttrain: done" ;;
  *) echo "fasttrain: failed (exit $status): not requeued; see the first error line above" >&2 ;;
esac
exit $status
