# Airflow image of the platform: the official Airflow 3.3.2 / Python 3.11 image plus the exact
# runtime of requirements.lock and the project's code. Build from the repository root:
#   docker build -f deploy/docker/airflow.Dockerfile -t recsys-airflow .
FROM apache/airflow:3.3.2-python3.11

# torch's CPU build (the lock pins torch==2.13.0 and none of the CUDA build's nvidia-*/triton
# packages). --no-deps: its dependencies come from the lock below, at the lock's versions.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The official image's way: pip as the airflow user, --no-cache-dir. The lock pins
# apache-airflow==3.3.2 (the image's own version) and every other package, transitive ones
# included, so it is the only source of truth: no Airflow constraints file takes part
# (PIP_CONSTRAINT emptied), and whatever the image preinstalled at another version is moved
# to the lock's. pip check only warns: a provider that the base image preinstalled and the
# platform does not use may want another version of a shared package.
USER airflow
COPY --chown=airflow:root requirements.lock /opt/recsys/requirements.lock
RUN PIP_CONSTRAINT= pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
        torch==2.13.0 \
    && PIP_CONSTRAINT= pip install --no-cache-dir -r /opt/recsys/requirements.lock \
    && (pip check || echo "warning: pip check found conflicts (see above)" >&2)

# The project, importable from /opt/recsys (PYTHONPATH); DAGs and plugins in /opt/recsys/dags
# and /opt/recsys/plugins (set AIRFLOW__CORE__DAGS_FOLDER / PLUGINS_FOLDER to them, or mount over).
COPY --chown=airflow:root recsys/ /opt/recsys/recsys/
COPY --chown=airflow:root dags/ /opt/recsys/dags/
COPY --chown=airflow:root plugins/ /opt/recsys/plugins/
COPY --chown=airflow:root expectations/ /opt/recsys/expectations/
COPY --chown=airflow:root deploy/airflow/ /opt/recsys/deploy/airflow/
ENV PYTHONPATH=/opt/recsys
