#!/bin/bash
# MLflow tracking server on PostgreSQL: the backend URI is assembled here from POSTGRES_USER, POSTGRES_PASSWORD
# (or POSTGRES_PASSWORD_FILE, a Docker secret), POSTGRES_HOST/PORT/DB, and handed over in MLFLOW_BACKEND_STORE_URI
# so that the password is in no command line. MLFLOW_AUTH_ADMIN_PASSWORD_FILE and
# MLFLOW_FLASK_SERVER_SECRET_KEY_FILE (basic auth) likewise. Extra arguments (e.g.
# --app-name basic-auth) go to `mlflow server`. Uvicorn's worker health check waits 60 s, not its 5 s: on a busy
# host the 5 s default killed healthy workers over and over (MLFLOW_WORKERS, MLFLOW_WORKER_HEALTHCHECK_S).
set -euo pipefail
if [[ -n "${POSTGRES_PASSWORD_FILE:-}" ]]; then
    POSTGRES_PASSWORD=$(<"$POSTGRES_PASSWORD_FILE")
    export POSTGRES_PASSWORD
fi
if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}" ]]; then
    MLFLOW_AUTH_ADMIN_PASSWORD=$(<"$MLFLOW_AUTH_ADMIN_PASSWORD_FILE")
    export MLFLOW_AUTH_ADMIN_PASSWORD
fi
if [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY_FILE:-}" ]]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(<"$MLFLOW_FLASK_SERVER_SECRET_KEY_FILE")
    export MLFLOW_FLASK_SERVER_SECRET_KEY
fi
if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
    : "${POSTGRES_USER:?set POSTGRES_USER (or MLFLOW_BACKEND_STORE_URI)}"
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE}"
    MLFLOW_BACKEND_STORE_URI=$(python - <<'PY'
import os
from urllib.parse import quote

q = lambda key, default=None: quote(os.environ.get(key, default), safe="")
print(
    f"postgresql+psycopg2://{q('POSTGRES_USER')}:{q('POSTGRES_PASSWORD')}"
    f"@{os.environ.get('POSTGRES_HOST', 'db')}:{os.environ.get('POSTGRES_PORT', '5432')}"
    f"/{q('POSTGRES_DB', os.environ['POSTGRES_USER'])}"
)
PY
)
fi
export MLFLOW_BACKEND_STORE_URI
unset POSTGRES_PASSWORD
exec mlflow server \
    --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-2}" \
    --uvicorn-opts "--timeout-worker-healthcheck ${MLFLOW_WORKER_HEALTHCHECK_S:-60}" \
    --serve-artifacts --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" \
    "$@"
