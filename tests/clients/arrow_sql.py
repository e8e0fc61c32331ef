"""Reads a `POST /v1/sql?format=arrow` answer with pyarrow, as an analyst would.

Usage: arrow_sql.py URL SQL

Prints {"schema": [[name, type], ...], "rows": [...]} with the values as pyarrow gives them in
Python (timestamps as ISO strings with their offset, decimals as strings).
"""

import json
import sys
import urllib.request

import pyarrow as pa


def plain(value):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main():
    url = sys.argv[1].rstrip("/") + "/v1/sql?format=arrow"
    body = json.dumps({"sql": sys.argv[2]}).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        table = pa.ipc.open_stream(response.read()).read_all()
    rows = [[plain(v) for v in row.values()] for row in table.to_pylist()]
    print(json.dumps({"schema": [[f.name, str(f.type)] for f in table.schema], "rows": rows}))


if __name__ == "__main__":
    main()
