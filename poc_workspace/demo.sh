#!/usr/bin/env bash
# End-to-end POC demo on synthetic CMR data (ACDC + M&Ms layouts, one datalist per vendor), tiny model:
#   synthetic data -> job from the duallora_cmr3d template (target poc) -> POC on 127.0.0.1 (PocEnv, with the plugin's
#   site configuration provisioned) -> job -> results -> stop (always).
# Environment: SITES (default: the 4 vendor sites), ROUNDS (2), WORK (poc_workspace/demo).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-$HERE/demo}"
SITES="${SITES:-site-siemens,site-philips,site-ge,site-canon}"
ROUNDS="${ROUNDS:-2}"
N_SITES=$(awk -F, '{print NF}' <<< "$SITES")

if [[ ! -f "$WORK/datalists/clients.json" ]]; then
  flare-duallora generate cmr --out "$WORK/raw" --n 8 --shape 24 24 6
  flare-duallora split cmr --acdc "$WORK/raw/ACDC" --mnms "$WORK/raw/MnMs/OpenDataset" --out "$WORK/datalists"
fi

# the package's reference bundle has no pretrained weights (a demo of the mechanics, not of accuracy):
# allow_random_base lets every site build the same seeded network; set bundle_root=<your pretrained bundle> instead
# (the key=value settings come before the options: argparse takes no positionals after them)
flare-duallora template create duallora_cmr3d "$WORK/jobs/duallora_cmr3d" \
  "datalist_dir=$WORK/datalists" "num_rounds=$ROUNDS" "min_clients=$N_SITES" rank=4 local_epochs=1 \
  allow_random_base=true \
  'bundle_overrides={"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4, "batch_size": 4}' \
  --target poc --sites "$SITES"

flare-duallora poc run "$WORK/jobs/duallora_cmr3d" --clients "$SITES" --workspace "$WORK/poc"
