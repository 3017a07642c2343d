"""Sets up moto (server mode) for the pre-push check's end-to-end test, then
turns on moto's IAM enforcement.

Creates, while moto still accepts unsigned calls: a bucket, an IAM user (the
daemon's source identity) allowed to assume two roles, a role `reader` that
may list the bucket and a role `outsider` that may only list another bucket.
Then POSTs /moto-api/reset-auth with 0: from then on every request to moto
must be signed by a known key and allowed by its IAM policies (moto's
`INITIAL_NO_AUTH_ACTION_COUNT`). Prints the user's keys and the names as JSON.

Usage: python moto_iam_setup.py http://127.0.0.1:PORT
"""

import json
import sys
import urllib.request

import boto3

url = sys.argv[1]
ACCOUNT = "123456789012"
BUCKET = "aep-moto-bucket"
OTHER = "aep-moto-other"


def client(name):
    return boto3.client(
        name,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )


iam = client("iam")
s3 = client("s3")
s3.create_bucket(Bucket=BUCKET)
s3.create_bucket(Bucket=OTHER)

user = iam.create_user(UserName="aep-rotator")["User"]
iam.put_user_policy(
    UserName="aep-rotator",
    PolicyName="assume",
    PolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
        }
    ),
)
key = iam.create_access_key(UserName="aep-rotator")["AccessKey"]

trust = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": user["Arn"]}, "Action": "sts:AssumeRole"}
        ],
    }
)


def role(name, bucket):
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    iam.put_role_policy(
        RoleName=name,
        PolicyName="list",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        # What AWS checks for both of the pre-push check's
                        # requests (ListObjectsV2 and HeadBucket): s3:ListBucket.
                        "Action": "s3:ListBucket",
                        "Resource": f"arn:aws:s3:::{bucket}",
                    },
                    {
                        "Effect": "Allow",
                        # What moto checks on top: it names the action after the
                        # API call (s3:ListObjectsV2 since moto 5.2.6,
                        # s3:HeadBucket), not after the IAM action AWS
                        # documents. Granted separately so that a moto upgrade
                        # cannot change what the statement above proves.
                        "Action": ["s3:ListObjectsV2", "s3:HeadBucket"],
                        "Resource": f"arn:aws:s3:::{bucket}",
                    },
                ],
            }
        ),
    )
    return arn


reader = role("reader", BUCKET)
outsider = role("outsider", OTHER)

request = urllib.request.Request(
    f"{url}/moto-api/reset-auth",
    data=b"0",
    method="POST",
    # Not a form: moto reads the raw body as the count.
    headers={"Content-Type": "text/plain"},
)
urllib.request.urlopen(request).read()

print(
    json.dumps(
        {
            "access_key_id": key["AccessKeyId"],
            "secret_access_key": key["SecretAccessKey"],
            "bucket": BUCKET,
            "reader": reader,
            "outsider": outsider,
        }
    )
)
