#!/bin/sh
# Container entrypoint: `api` serves HTTP, `worker` runs jobs, anything else is exec'd as is.
set -eu
case "${1:-api}" in
  api)
    shift || true
    exec lorita serve --host 0.0.0.0 --port "${LORITA_PORT:-8000}" --no-worker "$@"
    ;;
  worker)
    shift
    exec lorita worker --queue "${LORITA_WORKER_QUEUE:-gpu}" --concurrency "${LORITA_WORKER_CONCURRENCY:-1}" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
