#!/usr/bin/env bash
# Step 1 of the "worth it" study: the fine-tuning recipe for the unguided condition, chosen on the validation
# split. Three recipes, the same base classifiers and sweep (copied), 3 seeds. Prints each run's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/longtail
mkdir -p runs/study
run() {  # run NAME [--set ...]
  local name=$1; shift
  if [ "$name" != ce ] && [ ! -d runs/study/val_$name/seed_0 ]; then
    mkdir -p runs/study/val_$name
    for s in runs/study/val_ce/seed_*; do mkdir -p runs/study/val_$name/$(basename $s); cp -r $s/base runs/study/val_$name/$(basename $s)/; done
    cp -r runs/study/val_ce/sweep runs/study/val_ce/judge runs/study/val_$name/
  fi
  $L demo --config configs/study/val_recipe.yaml --set out=runs/study/val_$name --no-progress "$@" > runs/study/val_$name.log 2>&1
  echo "== $name $*"; cat runs/study/val_$name/summary.txt
}
run ce
run la --set finetune.loss=logit_adjusted
run la12 --set finetune.loss=logit_adjusted --set schedule.epochs=12 --set 'schedule.generate_at=[0, 6]'
