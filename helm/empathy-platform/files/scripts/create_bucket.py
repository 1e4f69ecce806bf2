"""Create the S3 bucket if it does not exist (the chart's SeaweedFS hook Job; idempotent).

    python create_bucket.py BUCKET [TIMEOUT_S]

Endpoint and credentials come from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. The server
may still be starting: connection errors are retried until TIMEOUT_S (default 300) has passed.
"""

import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

bucket = sys.argv[1]
deadline = time.monotonic() + float(sys.argv[2] if len(sys.argv) > 2 else 300)
s3 = boto3.client("s3")
while True:
    try:
        s3.head_bucket(Bucket=bucket)
        print(f"bucket {bucket} exists")
        break
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise
        s3.create_bucket(Bucket=bucket)
        print(f"bucket {bucket} created")
        break
    except EndpointConnectionError as e:
        if time.monotonic() > deadline:
            sys.exit(f"S3 endpoint not reachable: {e}")
        time.sleep(3)
