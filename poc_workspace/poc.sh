#!/usr/bin/env bash
# Run an exported job folder in a POC on this machine (server and sites as separate processes, real startup kits),
# on 127.0.0.1, then stop every process of the POC (by PID):
#   poc_workspace/poc.sh JOB_FOLDER [--clients site-siemens,site-philips,...] [--port 8002] [--workspace DIR] [--allow-remote]
# (without --clients: the sites the job names, else its min_clients vendor sites)
# Everything (POC workspace, downloaded results, the HOME the POC processes see) stays under --workspace
# (default poc_workspace/workspace).  See poc_workspace/README.md.
set -euo pipefail
exec flare-duallora poc run "$@"
