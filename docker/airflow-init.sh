#!/usr/bin/env bash
# One-shot setup before the Airflow services start: metadata DB, finsent schema and views, the gpu pool.
set -euo pipefail
airflow db migrate
finsent db upgrade
# One slot per GPU: the pool is what keeps two scoring runs from sharing a card.
airflow pools set gpu "${FINSENT_GPU_SLOTS:-1}" "GPU slots for scoring and training (one per GPU)"
airflow pools list
