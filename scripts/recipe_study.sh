#!/usr/bin/env bash
# The recipe study of docs/recipes.md at one stated budget, on one GPU: every recipe, the deep-ensemble members
# and the knee model trained at once for MIN minutes, each CT recipe evaluated, then the ensemble baseline and the
# M/N ablation. Needs study/data.pt and study/knee.pt from `compare_recipes.py prepare` (CPU, about a minute).
#   MIN=3.5 bash scripts/recipe_study.sh study/gpu
set -u
MIN=${MIN:-3.5}
G=${1:-study/gpu}; mkdir -p "$G"
T=$(python3 -c "print(int($MIN*60+120))")
for r in v_quadratic v_quadratic_s1 v_quadratic_s2 v_quadratic_s3 v_eu_kl_low v_au regression; do
  timeout "$T" python3 scripts/compare_recipes.py train --recipe $r --minutes "$MIN" --batch 32 --M 6 --N 6 --steps 10 \
      --eval_slices 26 --eval_batch 26 --track_slices 8 --out "$G" > "$G/$r.log" 2>&1 &
done
timeout "$T" python3 scripts/compare_recipes.py train --data study/knee.pt --recipe knee_v_quadratic --minutes "$MIN" \
    --batch 32 --out "$G" > "$G/knee_v_quadratic.log" 2>&1 &
wait
timeout 300 python3 scripts/compare_recipes.py ablation --recipe v_quadratic --runs "$G" --M 6 --N 6 --steps 10 \
    --eval_slices 16 --eval_batch 16 > "$G/ablation.log" 2>&1 &
timeout 300 python3 scripts/compare_recipes.py report --runs "$G" --out "$G/recipes.md" --M 6 --N 6 --steps 10 \
    --eval_slices 26 --eval_batch 26 > "$G/report.log" 2>&1 &
wait
cat "$G/recipes.md"
