#!/usr/bin/env bash
# The CPU recipes that made the bundled weights (no GPU was available for them):
# ImageNet MobileNetV2 from the local file, BatchNorm statistics frozen, stage 1 trains the
# head for one epoch, stage 2 unfreezes the last five blocks (features.14-18).
# Usage: bash train/cpu_recipes.sh [DATA_ROOT] [TASK ...]   (default root ../shared/data, all tasks)
set -euo pipefail
root=${1:-../shared/data}
shift || true
pretrained=${PRETRAINED:-../shared/pretrained/mobilenet_v2-features-imagenet-onnxzoo7-webnn.pth}
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(ct_covid ct_cancer brain_mri cxr_pneumonia cxr_covid head_ct)
for task in "${tasks[@]}"; do
  extra=()
  case $task in
    ct_covid) epochs=12 ;;
    ct_cancer) epochs=12; extra=(--min-sensitivity 0.98) ;;  # malignant: a screening threshold
    # patients with a few positive slices: stratify by "any hemorrhage", larger val/test sides,
    # best epoch by validation ROC-AUC, threshold for validation sensitivity >= 0.9; last 8 blocks
    head_ct) epochs=14; extra=(--unfreeze 8 --patience 5 --select auc --val-frac 0.2 --test-frac 0.2
                               --stratify positive --min-sensitivity 0.9) ;;
    # screening thresholds (validation sensitivity >= 0.95); cxr_covid's border crop comes from the registry
    cxr_*) epochs=3; extra=(--min-sensitivity 0.95) ;;
    *) epochs=3 ;;
  esac
  python -m core.train --task "$task" --data "$root/$task" --pretrained "$pretrained" \
    --head-epochs 1 --epochs "$epochs" --unfreeze 5 "${extra[@]}" --device cpu --out weights 2>&1 \
    | tee "train/$task.log"
  # intervals, curves, indeterminate band, CAM faithfulness and randomisation check into the card
  python -m core.appraisal --task "$task" --data "$root/$task" 2>&1 | tee "train/$task.appraisal.log"
  case $task in  # does a chest X-ray model read the lungs or the source?
    cxr_*) python -m core.shortcuts --task "$task" --data "$root/$task" --write-card 2>&1 | tee "train/$task.shortcuts.log" ;;
  esac
done
# then refit the wrong-input guards on the new features: python -m core.guard --data-root "$root"
