#!/usr/bin/env bash
# The data-efficiency curve of the "worth it" study: unguided vs LTG (weight by the judge rule) vs best-of-4 at
# 5, 10, 25, 50 and 100 synthetic images per class (one round each, the demo's recipe), 3 seeds, test split.
# The paper claims LTG reaches its competitor's accuracy with about a quarter of the data. Each size is one run
# directory; base classifiers, judge and sweep are copied from the first, so only mining is redone.
# Prints one line per (size, condition): Few and top-1, mean ± std over seeds. About 1.5 h on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/longtail
mkdir -p runs/study
first=""
for n in 5 10 25 50 100; do
  out=runs/study/efficiency_$n
  if [ -n "$first" ] && [ ! -d $out/seed_0 ]; then
    mkdir -p $out
    for s in $first/seed_*; do mkdir -p $out/$(basename $s); cp -r $s/base $out/$(basename $s)/; done
    cp -r $first/sweep $first/judge $out/
  fi
  $L demo --no-progress --set out=$out --set 'conditions=[unguided, ltg, "bestof@4"]' --set 'sweep.signals=[total]' \
    --set judge.spec=train --set judge.min_ratio=0.9 --set schedule.epochs=6 --set 'schedule.generate_at=[0]' \
    --set schedule.per_round=$((n * 10)) --set trajectory=false --set distances=false > $out.log 2>&1
  first=${first:-$out}
  .venv/bin/python - "$out" "$n" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
for cond, row in m["conditions"].items():
    print(f"{sys.argv[2]:>4} per class  {cond:<10} few {row['few']['mean']:.3f} ± {row['few']['std']:.3f}  "
          f"top-1 {row['top1']['mean']:.3f} ± {row['top1']['std']:.3f}")
PY
done
