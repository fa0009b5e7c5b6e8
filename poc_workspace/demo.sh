#!/usr/bin/env bash
# End-to-end POC demo on synthetic CMR data (ACDC + M&Ms layouts, one datalist per vendor), tiny model:
#   synthetic data -> job from job_templates/duallora_cmr3d -> POC prepare (+ allow-list, privacy scope)
#   -> start -> submit -> wait -> results -> stop (always).
# Environment: SITES (default: the 4 vendor sites), ROUNDS (2), WORK (poc_workspace/demo), PORT (8002).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
WORK="${WORK:-$HERE/demo}"
SITES="${SITES:-site-siemens,site-philips,site-ge,site-canon}"
ROUNDS="${ROUNDS:-2}"
PORT="${PORT:-8002}"
N_SITES=$(awk -F, '{print NF}' <<< "$SITES")

if [[ ! -f "$WORK/datalists/clients.json" ]]; then
  flare-duallora generate cmr --out "$WORK/raw" --n 8 --shape 24 24 6
  flare-duallora split cmr --acdc "$WORK/raw/ACDC" --mnms "$WORK/raw/MnMs/OpenDataset" --out "$WORK/datalists"
fi

# the package's reference bundle (untrained: a demo of the mechanics, not of accuracy); set BUNDLE_ROOT to yours
BUNDLE_ROOT="${BUNDLE_ROOT:-$("$PYTHON" -c 'from flare_duallora.flare.templates import resolve_bundle_path as r
print(r("pkg://flare_duallora/bundles/cmr3d_vit_classification"))')}"
"$PYTHON" -m flare_duallora.flare.templates create duallora_cmr3d "$WORK/jobs/duallora_cmr3d" \
  "datalist_dir=$WORK/datalists" "num_rounds=$ROUNDS" "min_clients=$N_SITES" rank=4 local_epochs=1 \
  "bundle_root=$BUNDLE_ROOT" \
  'bundle_overrides={"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4, "batch_size": 4}'

"$HERE/poc.sh" --workspace "${NVFLARE_POC_WORKSPACE:-$HERE/workspace}" run "$WORK/jobs/duallora_cmr3d" \
  --sites "$SITES" --port "$PORT" --download "$WORK/results"
