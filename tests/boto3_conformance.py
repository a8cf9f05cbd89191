"""boto3 against the IVS Chat emulator: botocore's own model, serializers and
parsers must accept every answer. Run by tests/boto3.rs with the emulator's URL."""

import datetime
import sys

import boto3

url = sys.argv[1]
c = boto3.client(
    "ivschat",
    endpoint_url=url,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
LAMBDA = "arn:aws:lambda:us-east-1:123456789012:function:review"
LOGGING = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/abcdEFGH1234"

room = c.create_room(
    name="lobby",
    maximumMessageRatePerSecond=20,
    messageReviewHandler={"uri": LAMBDA, "fallbackResult": "DENY"},
    tags={"team": "chat"},
    loggingConfigurationIdentifiers=[LOGGING],
)
arn = room["arn"]
assert arn == f"arn:aws:ivschat:us-east-1:123456789012:room/{room['id']}", arn
assert len(room["id"]) == 12 and room["id"].isalnum(), room["id"]
assert isinstance(room["createTime"], datetime.datetime), room["createTime"]
assert room["createTime"] == room["updateTime"]
assert room["maximumMessageRatePerSecond"] == 20
assert room["maximumMessageLength"] == 500
assert room["messageReviewHandler"] == {"uri": LAMBDA, "fallbackResult": "DENY"}
assert room["tags"] == {"team": "chat"}
assert room["loggingConfigurationIdentifiers"] == [LOGGING]

got = c.get_room(identifier=arn)
assert {k: v for k, v in got.items() if k != "ResponseMetadata"} == {
    k: v for k, v in room.items() if k != "ResponseMetadata"
}
assert got["ResponseMetadata"]["HTTPStatusCode"] == 200
assert got["ResponseMetadata"]["RequestId"]

updated = c.update_room(identifier=arn, name="renamed", messageReviewHandler={"uri": ""})
assert updated["name"] == "renamed"
assert "messageReviewHandler" not in updated
assert updated["maximumMessageRatePerSecond"] == 20, "omitted fields stay"
assert updated["updateTime"] > room["updateTime"]
assert updated["createTime"] == room["createTime"]

listed = c.list_rooms(maxResults=10)["rooms"]
assert [r["arn"] for r in listed] == [arn]
assert "maximumMessageLength" not in listed[0], "summaries carry no limits"

c.tag_resource(resourceArn=arn, tags={"env": "prod"})
assert c.list_tags_for_resource(resourceArn=arn)["tags"] == {"team": "chat", "env": "prod"}
c.untag_resource(resourceArn=arn, tagKeys=["team"])
assert c.list_tags_for_resource(resourceArn=arn)["tags"] == {"env": "prod"}
assert c.get_room(identifier=arn)["updateTime"] == updated["updateTime"], "tags do not move updateTime"

try:
    c.update_room(identifier=arn, maximumMessageLength=501)
    raise AssertionError("501 accepted")
except c.exceptions.ValidationException as e:
    assert e.response["Error"]["Code"] == "ValidationException"
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert e.response["reason"] == "FIELD_VALIDATION_FAILED", e.response
    assert [f["name"] for f in e.response["fieldList"]] == ["maximumMessageLength"], e.response

missing = arn[:-12] + "AAAAAAAAAAAA"
try:
    c.get_room(identifier=missing)
    raise AssertionError("unknown room found")
except c.exceptions.ResourceNotFoundException as e:
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert e.response["resourceId"] == "AAAAAAAAAAAA", e.response
    assert e.response["resourceType"] == "ROOM", e.response

# Every region at one endpoint, as AWS's regional endpoints: the region is
# the one the request is signed for.
west = boto3.client(
    "ivschat",
    endpoint_url=url,
    region_name="eu-west-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
theirs = west.create_room(name="west")
assert theirs["arn"].startswith("arn:aws:ivschat:eu-west-1:123456789012:room/"), theirs["arn"]
assert [r["arn"] for r in west.list_rooms()["rooms"]] == [theirs["arn"]]
assert [r["arn"] for r in c.list_rooms()["rooms"]] == [arn], "us-east-1 does not list eu-west-1"
try:
    c.get_room(identifier=theirs["arn"])
    raise AssertionError("us-east-1 found a room of eu-west-1")
except c.exceptions.ResourceNotFoundException:
    pass
west.delete_room(identifier=theirs["arn"])

c.delete_room(identifier=arn)
assert c.list_rooms()["rooms"] == []
print("boto3 conformance: all checks passed")
