"""Runs meterd's ClickHouse statements in chDB (ClickHouse embedded in Python), for the
conformance test of the DDL meterd uses on current ClickHouse releases (tests/clickhouse_modern.rs).

Reads a JSON request on stdin:
  {"path": "<session directory>",
   "steps": [{"sql": "..."} | {"sql": "...", "rows": true}]}
A step with "rows" returns its result rows (the statement must not name a format); the others
only run. Prints {"version": "...", "results": [[row, ...] for each "rows" step]} on stdout.
Any failing statement fails the run, naming the statement.
"""

import json
import sys

from chdb import session


def main():
    request = json.load(sys.stdin)
    s = session.Session(request["path"])
    s.query("SET output_format_json_quote_64bit_integers = 0")
    version = s.query("SELECT version()", "TabSeparated").bytes().decode().strip()
    results = []
    for step in request["steps"]:
        sql = step["sql"]
        try:
            if step.get("rows"):
                out = s.query(sql, "JSONCompact").bytes().decode()
                results.append(json.loads(out)["data"] if out.strip() else [])
            else:
                s.query(sql)
        except Exception as e:  # noqa: BLE001 - reported with the statement, then fail
            print(f"statement failed: {e}\n{sql}", file=sys.stderr)
            sys.exit(1)
    s.close()
    json.dump({"version": version, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
