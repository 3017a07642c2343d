"""Sets up moto (server mode) for the coordination table's permission test,
then turns on moto's IAM enforcement.

Creates, while moto still accepts unsigned calls: the coordination table
(pk S HASH, sk S RANGE, on-demand) and two IAM users:

- `replica-full` may make every call the daemon makes on the table
  (the README's policy: GetItem, PutItem, UpdateItem, DeleteItem, Query,
  BatchWriteItem, plus DescribeTable and CreateTable for `coordination init`);
- `replica-noput` may make all of them but dynamodb:PutItem.

Then POSTs /moto-api/reset-auth with 0: from then on every request to moto
must be signed by a known key and allowed by the caller's IAM policies.
moto evaluates DynamoDB calls against the resource "*", so the policies
here name "*"; the README's policy names the table's ARN.
Prints the users' keys as JSON.

Usage: python moto_dynamodb_iam_setup.py http://127.0.0.1:PORT TABLE
"""

import json
import sys
import urllib.request

import boto3

url, table = sys.argv[1], sys.argv[2]

ACTIONS = [
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
    "dynamodb:BatchWriteItem",
    "dynamodb:DescribeTable",
    "dynamodb:CreateTable",
]


def client(name):
    return boto3.client(
        name,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )


dynamodb = client("dynamodb")
dynamodb.create_table(
    TableName=table,
    KeySchema=[
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ],
    AttributeDefinitions=[
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
    ],
    BillingMode="PAY_PER_REQUEST",
)

iam = client("iam")


def user(name, actions):
    iam.create_user(UserName=name)
    iam.put_user_policy(
        UserName=name,
        PolicyName="coordination",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}


full = user("replica-full", ACTIONS)
noput = user("replica-noput", [a for a in ACTIONS if a != "dynamodb:PutItem"])

request = urllib.request.Request(
    f"{url}/moto-api/reset-auth",
    data=b"0",
    method="POST",
    # Not a form: moto reads the raw body as the count.
    headers={"Content-Type": "text/plain"},
)
urllib.request.urlopen(request).read()

print(json.dumps({"full": full, "noput": noput}))
