"""infra.bucket against the local S3 server: the bucket's settings read back, idempotency, the IAM policy."""

import json
import urllib.request
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from infra.bucket import OBJECT_ACTIONS, BucketError, cluster_policy, create_bucket, main


def _name() -> str:
    return f"distill-infra-{uuid.uuid4().hex[:12]}"  # the server lives for the whole session: no name reuse


def _settings(bucket: str, region: str = "us-east-1") -> dict:
    s3 = boto3.client("s3", region_name=region)
    return {
        "location": s3.get_bucket_location(Bucket=bucket)["LocationConstraint"],
        "versioning": s3.get_bucket_versioning(Bucket=bucket)["Status"],
        "encryption": s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"],
        "public_access": s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"],
        "lifecycle": s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"],
    }


@pytest.mark.s3
def test_create_sets_everything_and_is_idempotent(s3_server):
    bucket = _name()
    assert create_bucket(bucket, region="us-east-1", checkpoint_days=5) == "us-east-1"
    first = _settings(bucket)
    assert first["location"] in (None, "us-east-1")
    assert first["versioning"] == "Enabled"
    assert first["encryption"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert first["public_access"] == {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                                      "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    rules = {r["ID"]: r for r in first["lifecycle"]}
    checkpoints = rules["expire-old-checkpoints"]
    assert checkpoints["Status"] == "Enabled"
    assert checkpoints["Filter"]["Prefix"] == "runs/"
    assert checkpoints["NoncurrentVersionExpiration"]["NoncurrentDays"] == 5
    assert checkpoints["Expiration"]["ExpiredObjectDeleteMarker"] is True
    assert "Days" not in checkpoints["Expiration"]  # current objects (kept checkpoints, models) never expire
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7

    boto3.client("s3").put_object(Bucket=bucket, Key="runs/a/records/manifest.json", Body=b"{}")
    create_bucket(bucket, region="us-east-1", checkpoint_days=5)  # again: no error, same state, data kept
    assert _settings(bucket) == first
    assert boto3.client("s3").get_object(Bucket=bucket, Key="runs/a/records/manifest.json")["Body"].read() == b"{}"


@pytest.mark.s3
def test_create_in_another_region_with_kms(s3_server):
    bucket, key = _name(), "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for _ in range(2):
        assert create_bucket(bucket, region="eu-west-1", kms_key_arn=key) == "eu-west-1"
    got = _settings(bucket, "eu-west-1")
    assert got["location"] == "eu-west-1"
    assert got["encryption"][0]["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms",
                                                                          "KMSMasterKeyID": key}
    assert got["encryption"][0]["BucketKeyEnabled"] is True


def test_bad_names_and_values_fail_in_one_line():
    with pytest.raises(BucketError, match="not a valid S3 bucket name"):
        create_bucket("My_Bucket")
    with pytest.raises(BucketError, match="--checkpoint-days 0"):
        create_bucket("distill-ok", checkpoint_days=0)
    with pytest.raises(BucketError, match="full ARN"):
        cluster_policy("distill-ok", kms_key_arn="alias/distill")


@pytest.mark.parametrize("prefix", ["", "runs/"])
def test_policy_is_least_privilege(prefix):
    policy = cluster_policy("distill-prod", prefix=prefix)
    assert policy["Version"] == "2012-10-17"
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert set(by_sid) == {"ListBucket", "ReadWriteObjects"}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert all("*" not in action for action in statement["Action"])
        assert statement["Resource"].startswith("arn:aws:s3:::distill-prod")
    assert by_sid["ListBucket"]["Action"] == ["s3:ListBucket"]
    assert by_sid["ListBucket"]["Resource"] == "arn:aws:s3:::distill-prod"
    assert by_sid["ReadWriteObjects"]["Action"] == OBJECT_ACTIONS
    assert by_sid["ReadWriteObjects"]["Resource"] == f"arn:aws:s3:::distill-prod/{prefix}*"
    if prefix:
        assert by_sid["ListBucket"]["Condition"] == {"StringLike": {"s3:prefix": ["runs/*"]}}
    else:
        assert "Condition" not in by_sid["ListBucket"]


def test_policy_with_kms_adds_only_that_key():
    key = "arn:aws:kms:us-east-1:123456789012:key/abc"
    extra = cluster_policy("distill-prod", kms_key_arn=key)["Statement"][2]
    assert extra == {"Sid": "UseBucketKey", "Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                     "Resource": key}


def test_policy_cli_prints_json(capsys):
    assert main(["policy", "--bucket", "distill-prod"]) == 0
    assert json.loads(capsys.readouterr().out) == cluster_policy("distill-prod")
    assert main(["policy", "--bucket", "Bad_Name"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'Bad_Name': not a valid S3 bucket name") and err.count("\n") == 1


def _set_auth(endpoint: str, count: str) -> None:
    """moto's switch for checking signatures and IAM policies: after `count` more requests ("inf": never)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # not a form: moto reads the raw body
    urllib.request.urlopen(request).close()


@pytest.mark.s3
def test_policy_enforced_by_the_server(s3_server):
    """A user holding only the printed policy can work on objects in the bucket, and do nothing else."""
    bucket, other = _name(), _name()
    create_bucket(bucket)
    boto3.client("s3").create_bucket(Bucket=other)
    iam = boto3.client("iam")
    user = f"cluster-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="distill-s3", PolicyDocument=json.dumps(cluster_policy(bucket)))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    s3 = boto3.client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])

    _set_auth(s3_server, "0")
    try:
        s3.put_object(Bucket=bucket, Key="runs/x/checkpoint_1/model.safetensors", Body=b"w")
        assert s3.get_object(Bucket=bucket, Key="runs/x/checkpoint_1/model.safetensors")["Body"].read() == b"w"
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [
            "runs/x/checkpoint_1/model.safetensors"]
        s3.delete_object(Bucket=bucket, Key="runs/x/checkpoint_1/model.safetensors")
        denied = [
            lambda: s3.put_object(Bucket=other, Key="a", Body=b"x"),
            lambda: s3.list_objects_v2(Bucket=other),
            lambda: s3.create_bucket(Bucket=_name()),
            lambda: s3.delete_bucket(Bucket=bucket),
            lambda: s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"}),
        ]
        for call in denied:
            with pytest.raises(ClientError, match="AccessDenied"):
                call()
    finally:
        _set_auth(s3_server, "inf")
