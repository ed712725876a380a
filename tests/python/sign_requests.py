"""Signs requests with the official OCI Python SDK, offline, for comparison with vcnpath's signer.

Reads one JSON object per line on stdin:
  {"method", "url", "body" (str or null), "date", "key_pem", "key_id"  or  "token"}
and writes one JSON object per line: {"authorization", "content_length", "x_content_sha256"}.
The URL is used exactly as given (no re-encoding), as it would go on the wire.
"""
import json
import sys

import oci
from oci._vendor import requests  # the SDK signs its vendored requests objects
from oci.auth.signers.security_token_signer import SecurityTokenSigner


def sign(case):
    request = requests.PreparedRequest()
    request.method = case["method"]
    request.url = case["url"]  # set directly: requests' own preparation would re-quote it
    request.headers = requests.structures.CaseInsensitiveDict({"date": case["date"]})
    body = case["body"]
    request.body = body  # a str, as the SDK passes its serialised JSON: it computes length and digest
    if "token" in case:
        signer = SecurityTokenSigner(case["token"], oci.signer.load_private_key(case["key_pem"], None))
    else:
        tenancy, user, fingerprint = case["key_id"].split("/")
        signer = oci.signer.Signer(tenancy, user, fingerprint, None, private_key_content=case["key_pem"])
    signer(request)
    return {
        "authorization": request.headers["authorization"],
        "content_length": request.headers.get("content-length"),
        "x_content_sha256": request.headers.get("x-content-sha256"),
    }


for line in sys.stdin:
    print(json.dumps(sign(json.loads(line))), flush=True)
