"""Create the MLflow artifact bucket if it is missing (the stack's one-shot `create-bucket` job).

Idempotent, so `docker compose up` may run it on every start. It goes through the S3 API with
the same credentials MLflow uses, so a wrong key fails here, before MLflow starts.
Environment: MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_BUCKET.
"""

from __future__ import annotations

import os
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

ATTEMPTS = 30  # the S3 gateway may still be opening after its healthcheck passes


def ensure_bucket(bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    for attempt in range(ATTEMPTS):
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"bucket {bucket!r} exists")
            return
        except ClientError as error:
            if error.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=bucket)
            print(f"bucket {bucket!r} created")
            return
        except EndpointConnectionError:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(2)


if __name__ == "__main__":
    ensure_bucket(os.environ["MLFLOW_BUCKET"])
