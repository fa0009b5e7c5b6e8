#!/usr/bin/env bash
# Thin wrapper of `python -m flare_duallora.flare.poc` (prepare | start | submit JOB | stop | status | run JOB).
#   ./poc.sh prepare [--sites site-siemens,site-philips] [--port 8002] [--method duallora] [--no-privacy]
#   ./poc.sh start
#   ./poc.sh submit JOB_FOLDER [--timeout 600] [--download DIR]
#   ./poc.sh stop
#   ./poc.sh run JOB_FOLDER [--sites ...]       # prepare + start + submit + stop (always stopped)
# Global options go before the command: --workspace DIR (default $NVFLARE_POC_WORKSPACE or poc_workspace/workspace),
# --home DIR (HOME for the nvflare commands, to keep ~/.nvflare untouched).
set -euo pipefail
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m flare_duallora.flare.poc "$@"
