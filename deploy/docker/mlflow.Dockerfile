# MLflow tracking server image of the platform: the official MLflow 3.17.2 image plus the auth
# app, the PostgreSQL driver and boto3, pinned in mlflow-requirements.txt.
# Build from the repository root:
#   docker build -f deploy/docker/mlflow.Dockerfile -t recsys-mlflow .
FROM ghcr.io/mlflow/mlflow:v3.17.2

COPY deploy/docker/mlflow-requirements.txt /opt/recsys/mlflow-requirements.txt
RUN pip install --no-cache-dir -r /opt/recsys/mlflow-requirements.txt \
    && python -c "import mlflow, psycopg2, boto3; assert mlflow.__version__ == '3.17.2'"
