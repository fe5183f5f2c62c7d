"""The S3 bucket the jobs use, and the least-privilege IAM policy of the cluster's instance role.

    python -m infra.bucket create --bucket NAME [--region R] [--checkpoint-days N] [--kms-key-arn ARN]
    python -m infra.bucket policy --bucket NAME [--prefix runs/] [--kms-key-arn ARN] > distill-s3-policy.json

`create` makes the bucket (or finds it already made by this account) and puts each of its
settings as a whole configuration, so running it twice leaves the same state, and running
it again repairs drift:

- versioning on: an overwritten or deleted object stays recoverable as a noncurrent version;
- default encryption: SSE-S3 (AES256), or SSE-KMS with `--kms-key-arn` (with an S3 bucket
  key, so that each object does not cost a KMS call);
- public access blocked: all four flags;
- lifecycle, two rules:
  * `expire-old-checkpoints`, on the runs prefix (`runs/`, where the shipped configs put
    `records.uri` and `train.run_dir`). Ray Train writes a checkpoint per report into
    `<train.run_dir>/checkpoint_<timestamp>/` and deletes those beyond
    `train.keep_checkpoints` itself; in a versioned bucket a delete only hides the object
    behind a delete marker, and its bytes stay billed as a noncurrent version. The rule
    expires noncurrent versions after `--checkpoint-days` days, then the delete markers
    left alone. Current objects (the kept checkpoints, records, `<run_dir>/model/`) never expire.
  * `abort-incomplete-uploads`, on the whole bucket: parts of a multipart upload that a
    killed job left unfinished are dropped after 7 days.

`policy` prints the IAM policy for the cluster nodes' role: list the bucket, and get, put,
delete objects (and abort their multipart uploads) in it; with `--prefix`, only under that
prefix; with `--kms-key-arn`, also encrypt and decrypt with that one key. Nothing else.

Credentials come from the standard AWS chain; nothing here reads or prints them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError

RUNS_PREFIX = "runs/"
ABORT_INCOMPLETE_UPLOADS_DAYS = 7
OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class BucketError(ValueError):
    """A bucket that cannot be made or configured as asked; one line."""


def _check_name(bucket: str) -> None:
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise BucketError(f"{bucket!r}: not a valid S3 bucket name (3-63 of a-z 0-9 . -, starting and ending "
                          f"with a letter or digit)")


def lifecycle_rules(checkpoint_days: int, prefix: str = RUNS_PREFIX) -> list[dict]:
    """The bucket's lifecycle rules (see the module docstring)."""
    return [
        {
            "ID": "expire-old-checkpoints",
            "Status": "Enabled",
            "Filter": {"Prefix": prefix},
            "NoncurrentVersionExpiration": {"NoncurrentDays": checkpoint_days},
            "Expiration": {"ExpiredObjectDeleteMarker": True},
        },
        {
            "ID": "abort-incomplete-uploads",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_UPLOADS_DAYS},
        },
    ]


def create_bucket(bucket: str, region: str | None = None, checkpoint_days: int = 7,
                  kms_key_arn: str | None = None, prefix: str = RUNS_PREFIX) -> str:
    """Make `bucket` (idempotent) and apply every setting; returns the region used."""
    _check_name(bucket)
    if checkpoint_days < 1:
        raise BucketError(f"--checkpoint-days {checkpoint_days}: must be >= 1")
    region = region or boto3.session.Session().region_name or "us-east-1"
    s3 = boto3.client("s3", region_name=region)
    create = {"Bucket": bucket}
    if region != "us-east-1":  # us-east-1 is the default location and refuses to be named
        create["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**create)
    except ClientError as e:
        code = e.response["Error"]["Code"]
        if code == "BucketAlreadyExists":
            raise BucketError(f"s3://{bucket}: the name is taken by another AWS account; pick another") from None
        if code != "BucketAlreadyOwnedByYou":
            raise
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    if kms_key_arn:
        default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key_arn}
        rule = {"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": True}
    else:
        rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": lifecycle_rules(checkpoint_days, prefix)})
    return region


def cluster_policy(bucket: str, prefix: str = "", kms_key_arn: str | None = None) -> dict:
    """The IAM policy document of the cluster's instance role (see the module docstring)."""
    _check_name(bucket)
    if prefix.startswith("/") or "*" in prefix:
        raise BucketError(f"--prefix {prefix!r}: give a key prefix such as runs/ (no leading /, no *)")
    list_bucket = {"Sid": "ListBucket", "Effect": "Allow", "Action": ["s3:ListBucket"],
                   "Resource": f"arn:aws:s3:::{bucket}"}
    if prefix:
        list_bucket["Condition"] = {"StringLike": {"s3:prefix": [f"{prefix}*"]}}
    statements = [list_bucket, {"Sid": "ReadWriteObjects", "Effect": "Allow", "Action": OBJECT_ACTIONS,
                                "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"}]
    if kms_key_arn:
        if not kms_key_arn.startswith("arn:aws:kms:"):
            raise BucketError(f"--kms-key-arn {kms_key_arn!r}: give the key's full ARN (arn:aws:kms:...)")
        statements.append({"Sid": "UseBucketKey", "Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                           "Resource": kms_key_arn})
    return {"Version": "2012-10-17", "Statement": statements}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bucket", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="make the jobs' bucket: versioned, encrypted, private, with lifecycle rules")
    p.add_argument("--bucket", required=True)
    p.add_argument("--region", help="default: the AWS config's region, else us-east-1")
    p.add_argument("--checkpoint-days", type=int, default=7,
                   help="days a deleted or overwritten object under --prefix stays recoverable (default 7)")
    p.add_argument("--prefix", default=RUNS_PREFIX, help=f"key prefix of the runs (default {RUNS_PREFIX})")
    p.add_argument("--kms-key-arn", help="encrypt with this KMS key (SSE-KMS) instead of SSE-S3")
    p = sub.add_parser("policy", help="print the IAM policy JSON of the cluster nodes' role")
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="", help="allow only keys under this prefix (default: the whole bucket)")
    p.add_argument("--kms-key-arn", help="the bucket's KMS key, if it uses SSE-KMS")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            region = create_bucket(args.bucket, args.region, args.checkpoint_days, args.kms_key_arn, args.prefix)
            encryption = f"SSE-KMS ({args.kms_key_arn})" if args.kms_key_arn else "SSE-S3 (AES256)"
            print(f"s3://{args.bucket} ({region}): versioning on, {encryption}, public access blocked, "
                  f"noncurrent versions under {args.prefix} expire after {args.checkpoint_days} days")
        else:
            print(json.dumps(cluster_policy(args.bucket, args.prefix, args.kms_key_arn), indent=2))
    except (BucketError, ClientError, BotoCoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
