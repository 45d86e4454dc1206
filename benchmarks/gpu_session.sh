#!/usr/bin/env bash
# The GPU measurements the README still lists as "not yet measured", in three stages that each
# end inside 10 minutes, so that a short lease of one GPU machine covers them.
#
#   bash benchmarks/gpu_session.sh STAGE [QM9_CACHE]
#
# STAGE:
#   bench    benchmarks.peers (throughput; PyG on the same GPU) and benchmarks.speed, timed
#            pipelined; peers again for mpnn and schnet with $STEPS (default 8) of our steps
#            per jit call, and with --sync-every-step (as the results before 2026-11-23);
#            benchmarks.roofline only with ROOFLINE=1                      (about 8-9 min)
#   accuracy experiments.qm9_u0 --preset standard (the accelerator's default model: vector
#            channels, silu attention, denoising) on the cpu preset's split (15,000 training
#            molecules) at batch $BATCH (default 64), $STEPS (default 8) train steps per jit
#            call, as many epochs as fit $MINUTES (default 7.5) minutes, timed first (or
#            $EPOCHS); $EXTRA adds
#            options (e.g. EXTRA="--weight-decay 0.01" TAG=wd0.01; TAG names the result
#            folder)                                                       (about 9 min)
#   scaling  benchmarks.scaling (energy + forces, 96 to 12,288 atoms of water) and a
#            3-minute experiments.qm9_u0 --preset standard run              (about 8 min)
#   long     one leg of a run longer than a device call: experiments.qm9_u0 as in accuracy,
#            $EPOCHS (default 600) epochs of the cosine, $STEPS (default 8) steps per jit
#            call, in runs/long[-$TAG]; it resumes when that folder holds checkpoints and
#            stops after $LEG_S (default 520) seconds (SIGINT; the checkpoints, saved every
#            30 s, stay). The archive holds the whole folder (latest + best checkpoint, ~8 MB
#            for the vector model): unpack it and carry runs/long[-$TAG] to the next call.
#            When the run ends (epochs or $TOTAL_MIN, default 60, minutes of training) the
#            results are copied to benchmarks/results/                   (about 10 min)
#   sweep    benchmarks.sweep: several experiments.qm9_u0 runs of the accuracy stage's setup
#            at once on the one GPU ($SWEEP names them, default vec64-silu-dn
#            vec64-silu-dn-es30-dip0.1 vec64-silu-dn-es30-dip vec128-silu-dn; `python -m
#            benchmarks.sweep --list`),
#            $MINUTES (default 6.5) minutes of training each, and their ensemble; each run's folder and the sweep's JSON land in
#            benchmarks/results/ (TAG names a second sweep of the same day) (about 9.5 min)
#   potential experiments.potential (its default model, so3krates) on $DATA (default
#            ethanol_xtb) for $MINUTES (default 7) minutes at $STEPS (default 8) train steps
#            per jit call, then its 10-ps NVE run; $EXTRA and $TAG as in accuracy: the
#            GPU's training and MD speed for a potential (on cpu2, 6,000 epochs ended level
#            with 4,363: docs/results.md, "SO3krates")                    (about 9 min)
#
# QM9_CACHE: the featurized QM9 cache (default .cache/qm9.npz; `python -m mpattn.data.qm9
# --summary` prints where it lives). With it no machine needs qm9pack or RDKit. The potential
# stage does not read it (its data is bundled).
#
# QUICK=1 runs every step on a few molecules/atoms, to check the stages on any machine (run it
# in a scratch clone: it writes result files like the real thing). PYTHON picks the
# interpreter (default python3, the one that holds PyTorch on the lent GPU machines).
#
# Everything lands in one archive, $OUT/<stage>.tar.gz (OUT defaults to runs/gpu-session),
# beside <stage>.log: unpack it in the repository root and the result files fall into
# benchmarks/results/ (the experiment folders under benchmarks/results/<name>/).
set -uo pipefail

stage=${1:?usage: bash benchmarks/gpu_session.sh bench|accuracy|scaling|long|sweep|potential [QM9_CACHE]}
cache=${2:-.cache/qm9.npz}
out=${OUT:-runs/gpu-session}
epochs=(${EPOCHS:+--epochs "$EPOCHS"})
batch=${BATCH:-64}
steps=${STEPS:-8}
long_epochs=${EPOCHS:-600}
minutes=${MINUTES:-7.5}
py=${PYTHON:-python3}
# the cpu preset's split (seed 0, 15,000 training molecules) for the accuracy and long stages,
# the split the sweep's variants and the CPU runs of the README train on
split15k=(--train-size 15000 --val-size 1000 --test-size 5000)
if [[ ${QUICK:-0} == 1 ]]; then
    small=(--models schnet --batches 1 --molecules 30)
    speed=("${small[@]}" --batch-sizes 8)
    multi=(--batches 2 --steps-per-call 2)
    roof=("${small[@]}" --batch-size 8)
    few=(--train-size 200 --val-size 50 --test-size 50)
    acc=("${few[@]}")
    epochs=(--epochs 2)
    scal=(--models schnet --sizes 96 384 --repeats 1 --fit-min-atoms 96)
    std=("${few[@]}" --epochs 1)
    long=("${few[@]}")
    long_epochs=${EPOCHS:-3}
    sweep=("${few[@]}" --epochs 2)
    pot=(--epochs 2 --md-ps 0.05)
else
    speed=() roof=(--models mpnn schnet mhmp attention) acc=() scal=() std=() long=()
    sweep=() pot=()
    multi=(--steps-per-call "$steps")
fi
case $stage in bench|accuracy|scaling|long|sweep|potential) ;; *)
    echo "unknown stage '$stage'; choose bench, accuracy, scaling, long, sweep or potential" >&2
    exit 2;;
esac
if [[ $stage != potential && ! -f $cache ]]; then
    echo "QM9 cache '$cache' not found (build it with: python -m mpattn.data.qm9 --summary)" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stamp=$(mktemp)  # result files newer than this are this stage's
log="$out/$stage.log"
day=$(date -u +%F)
gpu=$("$py" -c "from benchmarks.common import device_name; print(device_name())")
echo "stage $stage on $gpu, $(date -u +%FT%TZ), cache $cache" | tee "$log"

step() {  # step SECONDS COMMAND...: a time limit per step, so one slow step spares the rest
    local limit=$1; shift
    echo "+ $*" | tee -a "$log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
    echo "exit status ${PIPESTATUS[0]} ($(date -u +%T))" | tee -a "$log"
}

case $stage in
bench)
    # step limits sum to 510 s, so the archive is written inside a 600-s device call
    step 130 "$py" -m benchmarks.peers --dataset-cache "$cache" "${speed[@]}"
    # our steps K per jit call, and the per-step sync of the results before 2026-11-23
    step 100 "$py" -m benchmarks.peers --dataset-cache "$cache" "${speed[@]}" \
        --models mpnn schnet "${multi[@]}"
    step 80 "$py" -m benchmarks.peers --dataset-cache "$cache" "${speed[@]}" \
        --models mpnn schnet --sync-every-step
    step 200 "$py" -m benchmarks.speed --dataset-cache "$cache" "${speed[@]}"
    if [[ ${ROOFLINE:-0} == 1 ]]; then
        step 120 "$py" -m benchmarks.roofline --dataset-cache "$cache" "${roof[@]}"
    fi
    ;;
accuracy)
    # batch 64, not the cpu preset's 16: on one H100 a step at batch 16 is launch-bound (9 ms,
    # 1,920 mol/s; 52 epochs in 8.5 min), at 64 it takes 7 ms for 4x the molecules (README)
    work=benchmarks/results/qm9_u0-$gpu-$day-standard-15k-bs$batch${TAG:+-$TAG}
    # shellcheck disable=SC2086  # EXTRA is split into options on purpose
    step 570 "$py" -m experiments.qm9_u0 --dataset-cache "$cache" --preset standard \
        "${split15k[@]}" --batch-size "$batch" --time-budget-min "$minutes" \
        --steps-per-call "$steps" --workdir "$work" --no-progress \
        "${epochs[@]}" "${acc[@]}" ${EXTRA:-}
    cp "$log" "$work/log.txt"
    ;;
scaling)
    step 240 "$py" -m benchmarks.scaling "${scal[@]}"
    work=benchmarks/results/qm9_u0-$gpu-$day-standard-3min
    step 300 "$py" -m experiments.qm9_u0 --dataset-cache "$cache" --preset standard \
        --time-budget-min 3 --workdir "$work" --no-progress "${std[@]}"
    cp "$log" "$work/log.txt"
    ;;
long)
    work=runs/long${TAG:+-$TAG}
    resume=()
    if [[ -d $work/checkpoints ]]; then resume=(--resume); fi
    # shellcheck disable=SC2086  # EXTRA is split into options on purpose
    step "${LEG_S:-520}" "$py" -m experiments.qm9_u0 --dataset-cache "$cache" --preset standard \
        "${split15k[@]}" --batch-size "$batch" --epochs "$long_epochs" \
        --time-budget-min "${TOTAL_MIN:-60}" --steps-per-call "$steps" --keep-checkpoints 1 \
        --workdir "$work" --no-progress "${resume[@]}" "${long[@]}" ${EXTRA:-}
    cat "$log" >> "$work/legs.txt"
    if [[ -f $work/results.json ]]; then  # the run has ended: its results, no checkpoints
        done_dir=benchmarks/results/qm9_u0-$gpu-$day-long${TAG:+-$TAG}
        mkdir -p "$done_dir"
        find "$work" -maxdepth 1 -type f -exec cp {} "$done_dir/" \;
    fi
    ;;
sweep)
    # each run: ~10 s to load, a compiling and a timed epoch to plan, then its budget (which
    # holds no compile: the run reuses the trial's), ~10 s of test evaluation and plots;
    # 6.5 min leave ~180 s of the 570 for that, with four processes compiling at once
    # shellcheck disable=SC2086  # SWEEP is split into variant names on purpose
    step 570 "$py" -m benchmarks.sweep --dataset-cache "$cache" --minutes "${MINUTES:-6.5}" \
        --batch-size "$batch" --steps-per-call "$steps" ${SWEEP:+--variants $SWEEP} \
        ${TAG:+--tag "$TAG"} "${sweep[@]}"
    ;;
potential)
    data=${DATA:-ethanol_xtb}
    pmin=${MINUTES:-7}
    work=benchmarks/results/potential-$data-$gpu-$day-${pmin}min${TAG:+-$TAG}
    # shellcheck disable=SC2086  # EXTRA is split into options on purpose
    step 570 "$py" -m experiments.potential --data "$data" --time-budget-min "$pmin" \
        --steps-per-call "$steps" --workdir "$work" --no-progress "${pot[@]}" ${EXTRA:-}
    cp "$log" "$work/log.txt"
    ;;
esac

# the results and the experiments' small files; checkpoints stay behind (they are large),
# except a long run's own folder, which the next leg resumes from
{
    find benchmarks/results -newer "$stamp" -type f ! -path '*/checkpoints/*' -print0
    if [[ $stage == long ]]; then find "$work" -type f -print0; fi
} | tar --null -czf "$out/$stage.tar.gz" -T -
echo "wrote $out/$stage.tar.gz:" | tee -a "$log"
tar -tzf "$out/$stage.tar.gz" | tee -a "$log"
rm -f "$stamp"
