#!/usr/bin/env bash
# The seed's simple rollout, with `az ml` replaced by `saferollout --backend azure`: the same verbs and flags.
#
#   register the new model -> create the endpoint (if it does not exist) -> create the new deployment ->
#   invoke it through the deployment header (smoke test) -> traffic 10 / 50 / 100 with a fixed pause ->
#   delete the old deployment.
#
# No gate watches the metrics: a faulty release is found only by whoever watches (runbooks/safe_rollout.yaml
# is the gated rollout). Run it against Azure ML with the workspace named in the environment (docs/azure.md):
#
#   export AZURE_SUBSCRIPTION_ID=... AZURE_RESOURCE_GROUP=rg-saferollout AZUREML_WORKSPACE_NAME=ws-saferollout
#   MODEL_DIR=path/to/model examples/simple_rollout.sh
#
# Settings (environment): MODEL_DIR (required: the model folder or file to register), ENDPOINT (credit-risk),
# MODEL_NAME (credit-model), NEW (green), OLD (blue), PAUSE_S (60, the wait after each traffic step),
# REQUEST_FILE (a request body; by default one held-out row of the credit data is written to a temp file),
# BACKEND (azure; `local` runs the same script on the local platform), SAFEROLLOUT (the command).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXAMPLE="$HERE/credit-risk"
: "${MODEL_DIR:?set MODEL_DIR to the model folder (or file) to register}"
ENDPOINT="${ENDPOINT:-credit-risk}"
MODEL_NAME="${MODEL_NAME:-credit-model}"
NEW="${NEW:-green}"
OLD="${OLD:-blue}"
PAUSE_S="${PAUSE_S:-60}"
ML="${SAFEROLLOUT:-saferollout} --backend ${BACKEND:-azure}"   # was: ML="az ml"

step() { echo "==> $*" >&2; }

if [[ -z "${REQUEST_FILE:-}" ]]; then
  REQUEST_FILE="$(mktemp)"
  trap 'rm -f "$REQUEST_FILE"' EXIT
  python -c 'import json, saferollout.data as d; print(json.dumps(d.to_request(d.split().X_test.head(1))))' \
    > "$REQUEST_FILE"
fi

step "register model $MODEL_NAME from $MODEL_DIR"
$ML model create -n "$MODEL_NAME" -p "$MODEL_DIR" -o none

if ! $ML online-endpoint show -n "$ENDPOINT" -o none 2>/dev/null; then
  step "create endpoint $ENDPOINT"
  $ML online-endpoint create -f "$EXAMPLE/endpoint.yml" -n "$ENDPOINT" -o none
fi

old_exists=false
if $ML online-deployment show -n "$OLD" -e "$ENDPOINT" -o none 2>/dev/null; then
  old_exists=true
fi

step "create deployment $NEW (model $MODEL_NAME@latest) on $ENDPOINT"
$ML online-deployment create -f "$EXAMPLE/deployment.yml" -n "$NEW" -e "$ENDPOINT" -o none

step "smoke test: invoke $NEW through the deployment header"
$ML online-endpoint invoke -n "$ENDPOINT" -d "$NEW" -r "$REQUEST_FILE"

if $old_exists; then
  for split in "$OLD=90 $NEW=10" "$OLD=50 $NEW=50" "$OLD=0 $NEW=100"; do
    step "traffic $split"
    $ML online-endpoint update -n "$ENDPOINT" --traffic "$split" -o none
    sleep "$PAUSE_S"
  done
  step "delete the old deployment $OLD"
  $ML online-deployment delete -n "$OLD" -e "$ENDPOINT" -y -o none
else
  step "first release: traffic $NEW=100"
  $ML online-endpoint update -n "$ENDPOINT" --traffic "$NEW=100" -o none
fi

$ML online-endpoint show -n "$ENDPOINT" --query traffic
