"""schemathesis hooks for meterd (loaded through SCHEMATHESIS_HOOKS=meterd_hooks).

Each one teaches schemathesis something the OpenAPI document states in words but JSON Schema
cannot express:

- `date-time` values: meterd accepts event times within its window (at most 5 minutes ahead,
  at most 400 days old by default). Valid data must be accepted, so generated times fall in
  the last day, in any offset RFC 3339 allows.
- `application/x-ndjson`: the document describes the body as the array of events it carries;
  on the wire each event is one line.
"""

import json
from datetime import datetime, timedelta, timezone

import schemathesis
from hypothesis import strategies as st

NOW = datetime.now(timezone.utc)


@st.composite
def recent_times(draw):
    ago = draw(st.integers(min_value=60_000, max_value=86_400_000))
    offset_minutes = draw(st.integers(min_value=-14 * 60, max_value=14 * 60))
    fraction = draw(st.sampled_from(["", ".1", ".123", ".123456", ".123456789"]))
    zone = timezone(timedelta(minutes=offset_minutes))
    moment = (NOW - timedelta(milliseconds=ago)).astimezone(zone)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction
    if offset_minutes == 0 and draw(st.booleans()):
        return text + "Z"
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02}:{minutes:02}"


schemathesis.openapi.format("date-time", recent_times())


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, list):
        return "".join(json.dumps(item) + "\n" for item in value).encode()
    return json.dumps(value).encode()
