"""An S3-protocol server on 127.0.0.1 for the tests: moto's server mode (`ThreadedMotoServer`).

S3 costs money and needs the internet; moto speaks the real S3 REST wire protocol, so the real
clients run unchanged against it: DVC's S3 remote (dvc-s3 -> s3fs -> aiobotocore) and MLflow's
S3 artifact repository (boto3). Credentials are dummies, set in the environment like real ones
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never written into a config file.

    with S3Server() as s3:
        s3.create_bucket("tonetune")
        s3.endpoint_url   # http://127.0.0.1:PORT, for `dvc remote modify ... endpointurl`
        s3.env            # the variables a client process needs (also MLFLOW_S3_ENDPOINT_URL)
"""

from __future__ import annotations

import socket

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.env = {**DUMMY_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
                    "AWS_ENDPOINT_URL_S3": self.endpoint_url}
        self._server = None

    def __enter__(self) -> S3Server:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"])

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]
