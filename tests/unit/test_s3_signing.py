"""The signed-GET path (`artifactfs/sources/s3_get.py`) signs and addresses a GET exactly as
botocore does: the same canonical request, string to sign and signature as botocore's own
`S3SigV4Auth` for the same request and timestamp, and the same URL for a key as the GetObject
botocore would send. No server: nothing here is sent (GetObjects are stopped at
`before-send`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from botocore.config import Config

from artifactfs.sources.s3_get import (
    LeanGetter,
    Route,
    canonical_request,
    route_from_request,
    sign_get,
    signing_key,
)

KEYS = [
    "plain/key.bin",
    "sp ace/with space.bin",
    "plus+eq=amp&.bin",
    "tilde~and%percent%2F",
    "ünï/文字 ✓.bin",
    "a//b",
    "ends.",
    "q?x#y;z,@!$'()*",
    "/leading-slash",
]
ROUTES = [
    Route("http", "127.0.0.1", 9000, "127.0.0.1:9000", "/bkt/", "us-east-1"),
    Route("https", "bkt.s3.eu-west-1.amazonaws.com", None, "bkt.s3.eu-west-1.amazonaws.com", "/",
          "eu-west-1"),
]  # fmt: skip
AMZ_DATE = "20240229T235959Z"
SECRET = "wJalr/K7MDENG+bPxRfiCY"
VERSION = "3/L4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo"


def _botocore(route: Route, path: str, version: str | None, token: str | None) -> tuple[Any, Any]:
    """botocore's request and signer, headers set as its `add_auth` would set them (the
    version as a parameter, as botocore's serializer gives it)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    params = {"versionId": version} if version else {}
    request = AWSRequest(method="GET", url=f"{route.scheme}://{route.host}{path}", params=params)
    request.context["timestamp"] = AMZ_DATE
    auth = S3SigV4Auth(Credentials("AKIDEXAMPLE", SECRET, token), "s3", route.region)
    request.headers["X-Amz-Date"] = AMZ_DATE
    if token:
        request.headers["X-Amz-Security-Token"] = token
    request.headers["X-Amz-Content-SHA256"] = auth.payload(request)
    return request, auth


@pytest.mark.parametrize("route", ROUTES, ids=["http-path-style", "https-virtual-host"])
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE/session+token=="])
@pytest.mark.parametrize("version", [None, VERSION])
@pytest.mark.parametrize("key", KEYS)
def test_signature_equals_botocores(
    route: Route, token: str | None, version: str | None, key: str
) -> None:
    path = route.prefix + quote(key, safe="/~")
    query = f"versionId={quote(version, safe='-_.~')}" if version else ""
    ours = sign_get(
        host=route.host,
        path=path,
        query=query,
        region=route.region,
        access_key="AKIDEXAMPLE",
        token=token,
        amz_date=AMZ_DATE,
        key=signing_key(SECRET, AMZ_DATE[:8], route.region),
    )
    request, auth = _botocore(route, path, version, token)

    theirs_canonical = auth.canonical_request(request)
    signed = {k: v for k, v in ours.items() if k != "Authorization"}
    assert canonical_request(path, query, signed)[0] == theirs_canonical
    theirs = auth.signature(auth.string_to_sign(request, theirs_canonical), request)
    names = auth.signed_headers(auth.headers_to_sign(request))
    assert ours["Authorization"] == (
        f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{AMZ_DATE[:8]}/{route.region}/s3/aws4_request, "
        f"SignedHeaders={names}, Signature={theirs}"
    )
    # Every header botocore would sign has the value we send.
    for name, value in auth.headers_to_sign(request).items():
        assert ours[name] == value, name


def _client(**options: Any) -> Any:
    """A client like `s3_client()`'s, never used to send anything here."""
    import boto3
    from botocore.config import Config

    config = Config(
        response_checksum_validation="when_required", request_checksum_calculation="when_required"
    ).merge(options.pop("config", None) or Config())
    return boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        aws_session_token="token",
        region_name="eu-west-1",
    ).client("s3", config=config, **options)


class _Stopped(Exception):
    pass


def _sent_url(client: Any, bucket: str, key: str, **params: str) -> str:
    """The URL of a GetObject as botocore would send it (stopped before it is sent)."""

    def stop(request: Any, **kwargs: Any) -> None:
        raise _Stopped(request.url)

    client.meta.events.register("before-send.s3.GetObject", stop, unique_id="test-stop")
    try:
        client.get_object(Bucket=bucket, Key=key, **params)
    except _Stopped as stopped:
        return str(stopped.args[0])
    finally:
        client.meta.events.unregister("before-send.s3.GetObject", unique_id="test-stop")
    raise AssertionError("the GetObject was sent")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"endpoint_url": "http://127.0.0.1:9000"},
            Route("http", "127.0.0.1", 9000, "127.0.0.1:9000", "/bkt/", "eu-west-1"),
        ),
        (
            {},
            Route(
                "https",
                "bkt.s3.eu-west-1.amazonaws.com",
                None,
                "bkt.s3.eu-west-1.amazonaws.com",
                "/",
                "eu-west-1",
            ),
        ),
        (
            {"config": Config(s3={"addressing_style": "path"}), "region_name": "us-west-2"},
            Route(
                "https",
                "s3.us-west-2.amazonaws.com",
                None,
                "s3.us-west-2.amazonaws.com",
                "/bkt/",
                "us-west-2",
            ),
        ),
        (  # a default port is dropped from the Host header, as botocore signs it
            {"endpoint_url": "https://s3.example.test:443"},
            Route("https", "s3.example.test", 443, "s3.example.test", "/bkt/", "eu-west-1"),
        ),
    ],
    ids=["custom-endpoint", "aws-virtual-host", "aws-path-style", "default-port"],
)
def test_route_is_where_botocore_sends_a_get_and_keys_are_quoted_as_botocore_does(
    options: dict[str, Any], expected: Route
) -> None:
    client = _client(**options)
    getter = LeanGetter(client, client._request_signer._credentials)
    route, settled = getter._discover("bkt")
    assert settled and route == expected
    for key in KEYS:
        path = route.prefix + quote(key, safe="/~")
        assert urlsplit(_sent_url(client, "bkt", key)).path == path
        sent = urlsplit(_sent_url(client, "bkt", key, VersionId=VERSION))
        assert (sent.path, sent.query) == (path, f"versionId={quote(VERSION, safe='-_.~')}")


def test_no_route_for_a_get_signed_otherwise_than_by_plain_sigv4() -> None:
    legacy = _client(endpoint_url="http://127.0.0.1:9000", config=Config(signature_version="s3"))
    assert LeanGetter(legacy, legacy._request_signer._credentials)._discover("bkt") == (None, True)
    checksums = _client(
        endpoint_url="http://127.0.0.1:9000",
        config=Config(response_checksum_validation="when_supported"),
    )  # botocore would ask for checksums and check them: its GET, not ours
    route = LeanGetter(checksums, checksums._request_signer._credentials)._discover("bkt")
    assert route == (None, True)

    signed = {
        "X-Amz-Date": AMZ_DATE,
        "X-Amz-Content-SHA256": "e3b0",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AK/20240229/eu-west-1/s3/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=00",
    }
    url = "http://127.0.0.1:9000/bkt/k"
    assert route_from_request(url, signed) is not None
    assert route_from_request(url + "?x-id=GetObject", signed) is None  # a parameter not ours
    express = signed["Authorization"].replace("/s3/", "/s3express/")
    assert route_from_request(url, {**signed, "Authorization": express}) is None
    assert route_from_request(url, {**signed, "x-amz-request-payer": "requester"}) is None


def test_a_proxy_leaves_the_bucket_to_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = _client(endpoint_url="http://s3.example.test:9000")
    assert LeanGetter(client, client._request_signer._credentials)._discover("bkt") == (None, True)
