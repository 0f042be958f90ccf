#!/usr/bin/env bash
# Every training run behind the study (README "Study" sections and
# docs/study/README.md), at the reduced sizes this CPU can run. A run whose
# summary.json exists is skipped, so the script resumes where it stopped.
# Groups run in the order given (default: all); two groups in two shells use
# two cores:
#
#     bash docs/study/run.sh addition logic      # tau sweeps, then ACT against fixed depth
#     bash docs/study/run.sh parity sort pointer pondernet
#     bash docs/study/run.sh lm lm_sweep              # the byte LM (two shells: lm lm_sweep, lm_deep)
#     bash docs/study/run.sh retrofit                 # retrofitted recurrence (shells: retrofit, retrofit_deep,
#                                                     retrofit_seeds)
#
# Then redraw every figure and table: python docs/study/redraw.py
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # these small networks run fastest on one thread
STUDY=docs/study
TAUS="0.001 0.003 0.01 0.03 0.1 0.3"

train() {   # train <out name> <args...>; later arguments override earlier ones
    local out=$STUDY/$1; shift
    if [[ -f $out/summary.json ]]; then echo "have $out"; return; fi
    echo "== $out: $*"
    python -m act_kernels.train --eval-every 1000 "$@" --out "$out" --no-progress > /dev/null
    rm -f "$out/checkpoint.pt"
}

# K for the equal-compute baseline: ACT's mean steps per output, rounded, in
# the sweep run with the lowest sequence error (fewer steps break ties).
equal_compute_k() {
    python - "$@" <<'PY'
import json, sys
runs = [json.load(open(f"{d}/summary.json")) for d in sys.argv[1:]]
best = min(runs, key=lambda s: (s["final_sequence_error"], s["mean_steps_per_output"]))
print(max(1, round(best["mean_steps_per_output"])))
PY
}

sweep_and_baselines() {   # <task> <iterations> <knob args...>
    local task=$1 iters=$2; shift 2
    local dirs=()
    for tau in $TAUS; do
        train "sweep-$task-tau$tau" "$task" --tau "$tau" --iterations "$iters" "$@"
        dirs+=("$STUDY/sweep-$task-tau$tau")
    done
    local k
    k=$(equal_compute_k "${dirs[@]}")
    train "$task-fixed1" "$task" --fixed-steps 1 --iterations "$iters" "$@"
    train "$task-fixed$k" "$task" --fixed-steps "$k" --iterations "$iters" "$@"
}

group_addition() { sweep_and_baselines addition 10000 --knob max_len=3 --knob max_digits=3; }
group_logic() { sweep_and_baselines logic 8000; }
group_parity() {
    train parity32-act parity --knob size=32 --iterations 300000 --eval-every 10000
    train parity16-act parity --knob size=16 --iterations 200000 --eval-every 10000 --tau 1e-3
    train parity16-fixed parity --knob size=16 --iterations 200000 --eval-every 10000 --fixed-steps 1
    train parity8-act parity --iterations 25000 --tau 1e-3
    train parity8-act-tau1e-2 parity --iterations 40000 --eval-every 5000 --tau 1e-2
    train parity8-fixed parity --iterations 25000 --fixed-steps 1
    train parity8-fixed3 parity --iterations 25000 --fixed-steps 3   # parity8-act: 2.95 steps per input
}
group_sort() {
    train sort-act sort --iterations 10000 --tau 1e-3
    train sort-fixed sort --iterations 10000 --fixed-steps 1
    train sort-fixed3 sort --iterations 10000 --fixed-steps 3   # sort-act: 2.70 steps per output
}
group_pointer() {
    for k in 1 3 8; do train "pointer-fixed$k" pointer --iterations 6000 --eval-every 500 --fixed-steps "$k"; done
    train pointer-act pointer --iterations 6000 --eval-every 500
}
group_pondernet() {
    local common=(parity --knob size=8 --knob max_nonzero=4 --eval-knob max_nonzero=8 --hidden 128 --iterations 15000)
    train parity8-pondernet "${common[@]}" --method pondernet --beta 0.01 --prior 0.2
    train parity8-act-gru "${common[@]}" --cell gru --tau 1e-3
}

train_lm() {   # train_lm <out name> <args...>: the byte LM on the Python standard library
    local out=$STUDY/$1; shift
    if [[ -f $out/summary.json ]]; then echo "have $out"; return; fi
    echo "== $out: lm $*"
    python -m act_kernels.train lm --eval-every 500 --eval-windows 256 --iterations 3000 "$@" --out "$out" > /dev/null
    rm -f "$out/checkpoint.pt"
}
group_lm() {   # ACT at tau 0.01, the same model at fixed depth K (ACT's rounded mean steps), then 1 and M = 8
    train_lm lm-act-tau0.01 --tau 0.01
    local k
    k=$(python -c "import json; print(round(json.load(open('$STUDY/lm-act-tau0.01/summary.json'))['mean_steps']))")
    train_lm "lm-fixed$k" --fixed-steps "$k"
    train_lm lm-fixed1 --fixed-steps 1
}
group_lm_deep() { train_lm lm-fixed8 --fixed-steps 8; }
group_lm_equal() {   # a fixed-depth run at every ACT run's rounded mean steps
    local k
    for run in "$STUDY"/lm-act-tau*/summary.json; do
        k=$(python -c "import json; print(round(json.load(open('$run'))['mean_steps']))")
        train_lm "lm-fixed$k" --fixed-steps "$k"
    done
}
group_lm_sweep() { for tau in 0.001 0.003 0.03; do train_lm "lm-act-tau$tau" --tau "$tau"; done; }

# Retrofitted recurrence (docs/study/retrofit.py): a plain 4-layer transformers Llama trained 3000 steps,
# then from it 3000 more steps plain, or with its layers [1, 3) looped (ACT at three taus, fixed 2 steps),
# and plain 6-layer Llamas from scratch. Each run writes runs/retrofit/<name> (checkpoints and the saved
# model stay there, ignored by git); its log.jsonl, summary.json and summary.png are copied to
# docs/study/retrofit-<name>.
RETROFIT_BASE=runs/retrofit/plain4
train_hf() {   # train_hf <name> <args...>: the byte LM as a transformers model
    local out=$STUDY/retrofit-$1 work=runs/retrofit/$1; shift
    if [[ -f $out/summary.json ]]; then echo "have $out"; return; fi
    echo "== $out: lm $*"
    python -m act_kernels.train lm --eval-every 500 --eval-windows 256 --arch llama "$@" --out "$work" > "$work.out" 2>&1
    mkdir -p "$out"
    cp "$work"/{log.jsonl,summary.json,summary.png} "$out"/
}
retrofit_base() {   # the plain 4-layer model every retrofit starts from (again, if its saved model is gone)
    if [[ -f $RETROFIT_BASE/model.safetensors ]]; then return; fi
    rm -rf "$STUDY/retrofit-plain4" "$RETROFIT_BASE"
    mkdir -p runs/retrofit
    train_hf plain4 --plain --layers 4 --iterations 3000
}
group_retrofit() {
    mkdir -p runs/retrofit
    if [[ ! -f $STUDY/retrofit-plain4/summary.json ]]; then retrofit_base; fi
    local from=(--retrofit "$RETROFIT_BASE" --iterations 3000 --seed 1)   # a new draw of windows, a fresh Adam
    local need=0 name
    for name in plain4-continued act-tau0.001 act-tau0.01 act-tau0.03 fixed2; do
        [[ -f $STUDY/retrofit-$name/summary.json ]] || need=1
    done
    if (( need )); then retrofit_base; fi
    train_hf plain4-continued "${from[@]}" --plain
    for tau in 0.001 0.01 0.03; do train_hf "act-tau$tau" "${from[@]}" --block 1 3 --max-steps 4 --tau "$tau"; done
    train_hf fixed2 "${from[@]}" --block 1 3 --fixed-steps 2
}
group_retrofit_seeds() {   # a second draw of the continuation's windows and halting unit: how far one seed moves
    mkdir -p runs/retrofit
    local from=(--retrofit "$RETROFIT_BASE" --iterations 3000 --seed 2)
    [[ -f $STUDY/retrofit-plain4-continued-seed2/summary.json && -f $STUDY/retrofit-act-tau0.001-seed2/summary.json ]] \
        || retrofit_base
    train_hf plain4-continued-seed2 "${from[@]}" --plain
    train_hf act-tau0.001-seed2 "${from[@]}" --block 1 3 --max-steps 4 --tau 0.001
}
group_retrofit_deep() {   # plain 6-layer Llama from scratch: 6000 steps (the retrofits' 3000 + 3000)
    mkdir -p runs/retrofit
    train_hf plain6 --plain --layers 6 --iterations 6000
}

group_exits() {   # exit rules at inference (docs/study/exits.py): two looped Llamas, then every rule on both
    mkdir -p runs/exits
    local common=(--arch llama --layers 3 --block 1 3 --max-steps 8 --iterations 2000 --eval-every 500
                  --eval-windows 128 --seed 1)
    python -m act_kernels.train lm "${common[@]}" --fixed-steps 8 --sample-depth --out runs/exits/fixed8 \
        > runs/exits/fixed8.out 2>&1
    python -m act_kernels.train lm "${common[@]}" --halting pondernet --beta 0.01 --prior 0.2 --exit-threshold 0.5 \
        --out runs/exits/gate > runs/exits/gate.out 2>&1
    for run in fixed8 gate; do
        mkdir -p "$STUDY/exits-$run"
        cp runs/exits/$run/{log.jsonl,summary.json,summary.png} "$STUDY/exits-$run/"
    done
    python "$STUDY/exits.py" evaluate && python "$STUDY/exits.py"
}

for group in ${@:-addition logic parity sort pointer pondernet lm lm_sweep lm_deep lm_equal retrofit retrofit_deep retrofit_seeds exits}; do
    "group_$group"
done
