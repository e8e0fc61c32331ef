"""Sends meterd events with the CloudEvents Python SDK, as producers using it do.

Usage: cloudevents_sdk.py URL TENANT

Sends, to URL/v1/events: a binary-mode event (the SDK's default for HTTP: attributes in ce-*
headers, percent-encoded, the data as the JSON body) with the tenant in the `tenant` extension,
the same event again, a binary-mode event without `time` (as SDKs that do not default it send
one), a structured-mode event and a batch. Prints one JSON object per request:
{"mode", "status", "body"}.
"""

import json
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def post(url, headers, body):
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def main():
    url = sys.argv[1].rstrip("/") + "/v1/events"
    tenant = sys.argv[2]
    fmt = JSONFormat()
    data = {"provider": "anthropic", "model": "claude-sonnet-4", "input_tokens": 900,
            "output_tokens": 120, "cached_input_tokens": 300}
    minute_ago = datetime.now(timezone.utc) - timedelta(minutes=1)

    def event(attributes, payload):
        return CloudEvent({"specversion": "1.0", "source": "support-bot", "tenant": tenant,
                           **attributes}, payload)

    binary = event({"id": "sdk-binary-1", "type": "llm.usage", "time": minute_ago,
                    "subject": "user-9"}, data)
    untimed = to_binary(event({"id": "sdk-untimed-1", "type": "llm.usage"}, data), fmt)
    untimed.headers.pop("ce-time", None)
    structured = event({"id": "sdk-structured-1", "type": "agent.run", "time": minute_ago},
                       {"agent": "triage", "run_id": "run-7", "status": "succeeded",
                        "duration_ms": 5000})
    batch_body = "[" + ",".join(
        to_structured(event({"id": f"sdk-batch-{i}", "type": "api.request", "time": minute_ago},
                            {"route": "/v1/chat", "method": "POST", "status_code": 200,
                             "latency_ms": 40 + i}), fmt).body.decode()
        for i in range(3)) + "]"
    for mode, (headers, body) in [
        ("binary", (to_binary(binary, fmt).headers, to_binary(binary, fmt).body)),
        ("binary-again", (to_binary(binary, fmt).headers, to_binary(binary, fmt).body)),
        ("binary-untimed", (untimed.headers, untimed.body)),
        ("structured", (to_structured(structured, fmt).headers,
                        to_structured(structured, fmt).body)),
        ("batch", ({"content-type": "application/cloudevents-batch+json"},
                   batch_body.encode())),
    ]:
        status, answer = post(url, dict(headers), body)
        print(json.dumps({"mode": mode, "status": status, "body": answer,
                          "headers": sorted(k.lower() for k in headers)}))


if __name__ == "__main__":
    main()
